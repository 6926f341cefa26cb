"""Report schema. `schema_version` changes whenever a field changes meaning."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 10  # 2: distill training, gates, run peak memory, plan estimates; 3: typed per-layer errors;
# 4: latency rounds and ranges, `speed` (base and result timed interleaved in one process), task scores;
# 5: `search` (every candidate `compress search` tried or skipped); 6: `divergence` (KL and top-1 vs the base);
# 7: `expert_tokens` (per-expert routed calibration tokens of a mixture of experts); 8: `domains` (further
# evaluation texts, `evaluate.also`); 9: `linear_bits` (mixed precision: each linear's width); 10: `Training.compute`
# (float32 or bfloat16 autocast)


class Frozen(BaseModel):
    # A NaN perplexity (a broken model) is written as "NaN" and read back, not turned into null.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")


class Perplexity(Frozen):
    value: float
    text: str  # where the text came from
    seq_len: int
    tokens: int  # tokens scored (windows x seq_len)
    protocol: str = "non-overlapping windows, each scored alone, mean token NLL over the windows"


class Similarity(Frozen):
    mean: float
    min: float
    texts: int
    text: str
    protocol: str = "cosine of mean-pooled last hidden states, compressed vs base, per text"


class Divergence(Frozen):
    """The result's next-token distributions against the base's on the perplexity windows."""

    kl_mean: float  # KL(base || result), nats per position
    kl_p99: float  # its 99th percentile over the positions
    kl_max: float
    top1_agreement: float  # share of positions where both models' most likely next token is the same
    positions: int
    text: str
    protocol: str = (
        "KL(base || result) of the full next-token distributions at every position of the perplexity windows, "
        "both models in one process (llama.cpp's perplexity --kl-divergence protocol)"
    )


class Latency(Frozen):
    prefill_tokens_per_s: float
    decode_tokens_per_s: float | None
    batch: int = 1
    prompt_len: int
    new_tokens: int | None
    runtime: str = "torch"
    kernel: str
    device: str
    dtype: str
    rounds: int = 3  # timed rounds; the rates are their medians
    prefill_range: list[float] | None = None  # [min, max] over the rounds
    decode_range: list[float] | None = None


class Speed(Frozen):
    """The result's speed over the base's, both timed in one process with rounds interleaved."""

    prefill: float | None  # median over rounds of (result / base) for each adjacent pair of rounds
    prefill_range: list[float] | None  # [min, max] of those ratios
    decode: float | None
    decode_range: list[float] | None
    rounds: int
    noisy: bool  # the ratios spread too widely to state one (the machine was busy)
    protocol: str = (
        "base and result loaded in one process, rounds interleaved (base, result, result, base, ...), "
        "ratio per adjacent pair, median and range"
    )


class TaskScore(Frozen):
    metric: str  # "acc": share of questions answered right (0..1)
    value: float
    stderr: float | None
    samples: int | None
    protocol: str = "lm-eval, zero-shot, on the model as loaded by transformers"


class Domain(Frozen):
    """Perplexity (and divergence from the base) on one more evaluation text (`evaluate.also`)."""

    perplexity: Perplexity
    divergence: Divergence | None = None


class Measurement(Frozen):
    path: str
    bytes_on_disk: int
    bits_per_weight: float | None  # over the layers the method quantized
    # None below: not measured (--no-eval)
    parameters: int | None = None
    perplexity: Perplexity | None = None
    similarity: Similarity | None = None
    divergence: Divergence | None = None  # decoders measured against a base
    tasks: dict[str, TaskScore] = {}  # lm-eval task accuracy, by task name
    domains: list[Domain] = []  # decoders: the same on each of `evaluate.also`'s texts
    latency: Latency | None = None
    peak_rss_bytes: int | None = None  # peak resident memory of the process that loaded and measured it
    weights_in_memory_bytes: int | None = None  # parameters and buffers once loaded
    load_seconds: float | None = None
    # Set when this is an earlier run's measurement of the same weights, text, settings and
    # versions, read back instead of measured again: when that run measured it.
    reused_from: str | None = None


class Training(Frozen):
    """A distill stage's training: length, speed, loss curve and held-out perplexities."""

    steps: int
    resumed_from: int = 0  # the step a resumed run continued from
    tokens: int
    seconds: float
    tokens_per_s: float | None
    processes: int = 1
    compute: str = "float32"  # "float32" or "bfloat16 autocast" (the --autocast in force)
    text: str  # training text
    curve: list[dict[str, int | float]]  # per optimizer step: step, loss (and its parts), lr, seconds
    teacher_perplexity: float | None = None
    student_perplexity_before: float | None = None
    student_perplexity_after: float | None = None
    masked_zeros: int | None = None  # a sparse student: zeros held fixed
    fake_quantized: int = 0  # a quantized student: linears trained through their grid


class LayerError(Frozen):
    """Relative output error of one decoder layer on calibration text: with plain min/max RTN
    (quantization's baseline; None for pruning) and with the method."""

    layer: int
    rtn: float | None = None
    method: float


class StageRecord(Frozen):
    stage: str
    settings: dict[str, Any]
    layers: int
    ignored: list[str]
    seconds: float
    calibration: str | None = None  # calibration text and samples, for calibrated methods
    layer_errors: list[LayerError] = []  # per decoder layer
    layer_sparsity: list[dict[str, Any]] = []  # prune: per linear, the share of zero weights
    training: Training | None = None  # distill
    warnings: list[str] = []
    # mixture of experts: per experts module, the calibration tokens the router sent each expert (every expert was
    # calibrated on every token; these show which ones the text exercises)
    expert_tokens: dict[str, list[int]] | None = None
    # mixed precision (quantize --target-bits): each quantized linear's weight width, by full name
    linear_bits: dict[str, int] | None = None
    # Peak resident memory of the process while the stage ran, above what it used before
    # the model was loaded: the model plus the stage's working memory.
    peak_memory_bytes: int | None = None


class GateResult(Frozen):
    name: str
    limit: float
    value: float | None  # None: not measured (a failed gate)
    passed: bool
    shown: str  # value and limit, for people


class Candidate(Frozen):
    """One point of a `compress search`: its stages, what the plan expected, what was measured."""

    label: str  # e.g. "w4a16 g64 gptq"
    stages: list[dict[str, Any]]  # the recipe stages it ran
    estimated_bytes: int  # on disk, from the plan (nothing loaded)
    estimated_seconds: float
    verdict: str  # "met" | "missed" | "skipped" | "failed"
    reason: str = ""  # the missed gates, why it was skipped, or the error
    result: Measurement | None = None  # measured like every other candidate (None: not run)
    speed: Speed | None = None
    seconds: float | None = None  # wall time of its run, measurement included
    front: bool = False  # on the size/quality Pareto front of the measured candidates
    winner: bool = False


class Report(Frozen):
    schema_version: int = SCHEMA_VERSION
    tool: str
    created: str
    model: str
    task: str
    recipe: dict[str, Any]
    stages: list[StageRecord]
    base: Measurement | None
    result: Measurement
    environment: dict[str, str]
    notes: list[str] = []
    gates: list[GateResult] = []
    speed: Speed | None = None  # None: no base, or no latency measured
    passed: bool | None = None  # all gates passed; None: the recipe has no gates
    # Peak resident memory of the compress process over the whole run (stages and writing).
    run_peak_rss_bytes: int | None = None
    estimate: dict[str, float] | None = (
        None  # the plan's estimates (peak_rss_bytes, bytes_on_disk, seconds), to compare
    )
    search: list[Candidate] = []  # `compress search`: every candidate, in the order considered

    def ratio(self, field: str) -> float | None:
        if self.base is None:
            return None
        a, b = getattr(self.result, field), getattr(self.base, field)
        return a / b if a is not None and b else None
