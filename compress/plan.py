"""What a recipe will cost, before anything heavy is loaded: peak memory, disk, time per stage.

Model facts come from config.json and the safetensors headers (or the GGUF's tensor table);
the memory model's constants were fitted on SmolLM2-135M runs on CPU (benchmarks/RESULTS.md
records estimate against measurement) and scale with parameters, tokens and widths.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil
import torch

from compress.distill.losses import CHUNK, fused
from compress.errors import UsageError
from compress.eval.size import headers
from compress.formats.gguf_meta import arch_int
from compress.models import arch
from compress.models.compute import compute_dtype, stored_dtype
from compress.models.experts import expert_count, keep_count
from compress.models.load import check_weights, task_of
from compress.models.source import Source, cache_dir, fingerprint
from compress.quant import schemes
from compress.quant.mixed import SENSITIVITY_TOKENS
from compress.recipe import DistillStage, PruneStage, QuantizeStage, Recipe

MB = 2**20
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
IMPORTS = 400 * MB  # python + torch + transformers + compress, before the model is loaded
# Model-sized matmuls run faster than the 512 x 512 probe `matmul_gflops` times (fitted on the
# SmolLM2-135M GPTQ and distill runs: 53 s and 469 s on 2 cores).
EFFICIENCY = 1.2
# Distillation's flops a second as a share of the probe's, by autocast (fitted on `compress distill` of SmolLM2 with
# 10 layers dropped, 80 steps of 4 x 256 tokens, 2 AMD EPYC cores, probe 199 GFLOPS: 484 s in float32, 328 s under
# bfloat16 autocast, fused losses; the 600-step run took 4.14 s a step as the 80-step one did). Autograd's losses
# (reverse-kl, jsd) take 1.45x longer (benchmarks/RESULTS.md, "One distillation step").
DISTILL_RATE = {False: 0.73, True: 1.08}
DISTILL_AUTOGRAD = 1.45


@dataclass(frozen=True)
class Facts:
    """What a checkpoint holds, by kind of parameter."""

    task: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    linear: int  # parameters in decoder-layer weight matrices (what quantization and pruning touch)
    embed: int
    head: int  # 0 when tied to the embeddings
    other: int
    dtype_bytes: int
    compute_bytes: int = 0  # bytes per weight while computing (0: the dtype's; 4 when 16-bit computes in float32)
    linear_bits: float = 0.0  # stored bits per linear weight (0: the dtype's)
    widths: tuple[int, ...] = ()  # input widths of the decoder-layer linears (group sizes must divide them)
    positions: int | None = None  # tokens the model can attend over (max_position_embeddings)
    experts: int = 0  # of `linear`, parameters in a mixture of experts' experts
    n_experts: int = 0  # experts per MoE layer

    @property
    def params(self) -> int:
        return self.linear + self.embed + self.head + self.other

    @property
    def bytes_in_memory(self) -> int:
        return self.params * (self.compute_bytes or self.dtype_bytes)

    @property
    def bytes_on_disk(self) -> int:
        bits = self.linear_bits or self.dtype_bytes * 8
        return int(self.linear * bits / 8 + (self.embed + self.head + self.other) * self.dtype_bytes)


@dataclass
class StagePlan:
    name: str
    seconds: float
    peak_bytes: int  # process resident memory at the stage's peak
    after: Facts
    disk_bytes: int = 0  # written while it runs (training checkpoints, a kept stage result)


@dataclass
class Plan:
    model: str
    base: Facts
    stages: list[StagePlan]
    output_bytes: int
    disk_bytes: int
    disk_free: int
    memory_available: int
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return max(s.peak_bytes for s in self.stages)


def _classify(name: str, shape: list[int], f: dict[str, int], widths: set[int]) -> None:
    n = 1
    for s in shape:
        n *= s
    low = name.lower()
    if "embed" in low or low.startswith("token_embd") or "wte" in low or "wpe" in low:
        f["embed"] += n
    elif low.startswith(("lm_head", "output.")):
        f["head"] += n
    elif len(shape) == 2 and any(k in low for k in (".layers.", ".layer.", ".h.", "blk.")):
        f["linear"] += n
        widths.add(shape[1] if not low.startswith("blk.") else shape[0])  # GGUF lists dimensions innermost first
    else:
        f["other"] += n


def facts(src: Source, dtype: str) -> Facts:
    counts = {"embed": 0, "head": 0, "linear": 0, "other": 0}
    if src.is_gguf:
        # the copy the run reads (`-auto`, `-float32`, ...: one per --dtype), else any other
        found = [
            p
            for p in (cache_dir() / "gguf").glob(f"{src.path.stem}-{fingerprint(src.path)}-*")
            if (p / "config.json").is_file()
        ]
        cached = min(found, key=lambda p: not p.name.endswith(f"-{dtype}"), default=None)
        if cached is None:
            return _gguf_facts(src.path, dtype)
        src = replace(src, path=cached)
    try:
        cfg = json.loads((src.path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{src.spec}: cannot read config.json ({exc})") from None
    check_weights(src.path)  # a corrupt or truncated file is refused here, before its header is read
    head = headers(src.path)
    if not head:
        raise UsageError(f"{src.spec}: no safetensors weights to plan from")
    widths: set[int] = set()
    for name, entry in head.items():
        _classify(name, entry["shape"], counts, widths)
    in_experts = sum(math.prod(e["shape"]) for n, e in head.items() if ".experts." in n and len(e["shape"]) == 2)
    n_experts = (expert_count(cfg) or (None, 0))[1]
    # as the run stores it (models.load.resolve_dtype): the config's dtype, not the widest tensor's (a float32 norm or
    # another --dtype's cached copy made SmolLM2's plan count its bf16 embedding at 4 bytes: 165 MiB for 111)
    d = DTYPE_BYTES.get(dtype) or stored_dtype(cfg).itemsize
    return Facts(
        task=task_of(cfg.get("architectures")),
        layers=cfg.get("num_hidden_layers") or cfg.get("n_layer") or 1,
        hidden=cfg.get("hidden_size") or cfg.get("n_embd") or 1,
        intermediate=cfg.get("intermediate_size") or 4 * (cfg.get("hidden_size") or 1),
        vocab=cfg.get("vocab_size") or 1,
        dtype_bytes=d,
        widths=tuple(sorted(widths)),
        positions=arch.max_positions(cfg),
        experts=in_experts,
        n_experts=n_experts,
        **counts,
    )


def _gguf_facts(path: Path, dtype: str) -> Facts:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - gguf raises ValueError, struct or memmap errors on a bad file
        raise UsageError(f"{path}: not a readable GGUF file ({str(exc).strip()[:200] or type(exc).__name__})") from None
    counts = {"embed": 0, "head": 0, "linear": 0, "other": 0}
    widths: set[int] = set()
    for t in reader.tensors:
        _classify(t.name, [int(s) for s in t.shape], counts, widths)

    def meta(key: str) -> int:
        return arch_int(reader, key) or 0

    hidden = meta("embedding_length")
    return Facts(
        task="causal-lm",
        layers=meta("block_count"),
        hidden=hidden,
        intermediate=meta("feed_forward_length") or 4 * hidden,
        vocab=counts["embed"] // max(hidden, 1),
        dtype_bytes=DTYPE_BYTES.get(dtype, 2),
        widths=tuple(sorted(widths)),
        **counts,
    )


def matmul_gflops() -> float:
    """This machine's float32 matmul speed, timed for a fraction of a second."""
    a = torch.randn(512, 512)
    a @ a
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.2:
        a @ a
        n += 1
    return 2 * 512**3 * n / (time.perf_counter() - t0) / 1e9


def forward_seconds(params: int, tokens: int, gflops: float) -> float:
    """A forward pass over `tokens` through `params` weights (2 flops per weight and token)."""
    return 2 * params * tokens / (EFFICIENCY * gflops * 1e9)


def _after_prune(f: Facts, st: PruneStage) -> Facts:
    if st.method == "experts" and f.n_experts:
        kept = keep_count(f.n_experts, st.experts_keep)
        gone = int(f.experts * (1 - kept / f.n_experts))
        return replace(f, linear=f.linear - gone, experts=f.experts - gone, n_experts=kept)
    if st.method != "structured":
        if st.storage == "sparse":
            kept = 1 - st.share
            value_bits = (
                12 if f.dtype_bytes == 2 else f.dtype_bytes * 8
            )  # bf16: sign/mantissa byte + 4-bit exponent code
            return replace(f, linear_bits=1 + kept * value_bits)
        return f
    per_layer = f.linear / max(f.layers, 1)
    mlp = min(3 * f.hidden * f.intermediate, per_layer)
    attn = per_layer - mlp
    dropped = len(st.drop_layers) if isinstance(st.drop_layers, list) else (st.drop_layers or 0)
    layers = f.layers - dropped
    mlp_keep, heads_keep = st.mlp_keep or 1.0, st.heads_keep or 1.0
    q_o = min(2 * f.hidden * f.hidden, attn)
    new_layer = mlp * mlp_keep + (attn - q_o) + q_o * heads_keep
    other_per_layer = f.other / max(f.layers, 1)
    intermediate = int(f.intermediate * mlp_keep)
    widths = tuple(sorted({intermediate if w == f.intermediate else w for w in f.widths}))
    return replace(
        f,
        layers=layers,
        intermediate=intermediate,
        linear=int(new_layer * layers),
        other=int(f.other - other_per_layer * dropped),
        widths=widths,
    )


def _after_quantize(f: Facts, st: QuantizeStage) -> Facts:
    widths = f.widths or (f.hidden, f.intermediate)
    if st.target_bits is not None:  # mixed precision: the budget is the stored bits a weight
        return replace(f, linear_bits=st.target_bits)
    return replace(
        f,
        linear_bits=schemes.bits_per_weight(
            st.scheme, st.group_size, schemes.symmetric_for(st.scheme, st.symmetric, bool(f.experts)), widths
        ),
    )


def _stage(st, f: Facts, teacher: Facts | None, gflops: float) -> tuple[StagePlan, Facts]:
    model = f.bytes_in_memory
    if isinstance(st, (QuantizeStage, PruneStage)):
        m = st.method_class
        tokens = st.samples * st.seq_len if m.calibrated else 0
        peak = IMPORTS + int(model * (1 + m.working_memory))
        forward = m.time_multiple(st) * forward_seconds(f.linear, tokens, gflops)
        if isinstance(st, QuantizeStage):
            search = (0.12 if st.range_search else 0.005) * f.linear / 1e6  # per-group range search
            if st.target_bits is not None:  # quant/mixed.py: a layer forward per linear and width
                search += len(st.bit_widths) * 7 * forward_seconds(f.linear, SENSITIVITY_TOKENS, gflops)
            after = _after_quantize(f, st)
            return StagePlan(f"quantize {st.scheme} {st.method}", search + forward, peak, after), after
        after = _after_prune(f, st)
        return StagePlan(f"prune {st.method}", 0.05 * f.linear / 1e6 + forward, peak, after), after
    # distill: float32 student + gradients + AdamW moments of the trainable part, float32 teacher,
    # and the activations of one micro-batch (logits of both models dominate on small models).
    t = teacher or f
    trainable = f.linear + f.other + (f.embed if st.train_embeddings else 0)
    steps = st.total_steps(st.batch_size * st.grad_accum)
    tokens = st.batch_size * st.seq_len  # per micro-batch
    bf16 = st.bf16("cpu")  # plans time CPUs
    # the fused losses (kl) keep student and teacher logits and the logits' gradient in the compute dtype; autograd's
    # (reverse-kl, jsd) keep float32 log-softmaxes and their gradients beside them
    logits = tokens * f.vocab * (3 * (2 if bf16 else 4) if fused(st.loss) else 4 * 8)
    logits += CHUNK * f.vocab * 4 * 5  # a chunk's float32 softmaxes, logits and gradient
    if bf16:  # autocast keeps a bfloat16 copy of every weight it multiplies, the teacher's and the student's
        logits += 2 * (f.params + t.params)
    layers_act = (
        tokens * f.layers * (16 * f.hidden + 4 * f.intermediate) * 4 * (0.2 if st.gradient_checkpointing else 1.0)
    )
    attn = st.batch_size * st.seq_len**2 * 16 * 4 * (1 if st.gradient_checkpointing else f.layers) // 4
    peak = IMPORTS + 4 * f.params + 12 * trainable + 4 * t.params + logits + int(layers_act) + attn
    flops = steps * st.batch_size * st.grad_accum * st.seq_len * (2 * t.params + 6 * f.params)
    slower = 1.0 if fused(st.loss) else DISTILL_AUTOGRAD
    seconds = flops * slower / (DISTILL_RATE[bf16] * gflops * 1e9) + forward_seconds(
        t.params + 2 * f.params, 8192, gflops
    )  # + held-out perplexities
    ckpt = 16 * f.params  # float32 student + AdamW moments
    return StagePlan("distill", seconds, int(peak), f, disk_bytes=ckpt), f


def make(recipe: Recipe, src: Source, teachers: list[Source], dest: Path, gflops: float | None = None) -> Plan:
    """gflops: the machine's matmul speed when the caller has timed it already (plans of many
    candidates share one probe)."""
    base = facts(src, recipe.dtype)
    half = torch.bfloat16 if base.dtype_bytes == 2 else torch.float32
    if compute_dtype(half, recipe.device, 4 * base.params) == torch.float32:
        base = replace(base, compute_bytes=4)
    notes = []
    if src.is_gguf and not any((cache_dir() / "gguf").glob(f"{src.path.stem}-{fingerprint(src.path)}-*/config.json")):
        notes.append("the GGUF is de-quantized to a cached Hugging Face checkpoint first")
    gflops = gflops or matmul_gflops()
    f, plans, t_iter = base, [], iter(teachers)
    for i, st in enumerate(recipe.stages):
        teacher = None
        if isinstance(st, DistillStage):
            t_src = next(t_iter)
            teacher = base if t_src == src else facts(t_src, "float32")
        plan, f = _stage(st, f, teacher, gflops)
        if i < len(recipe.stages) - 1:
            plan.disk_bytes += f.bytes_on_disk  # kept under .OUT.partial/stages until the run ends
        plans.append(plan)
    output = f.bytes_on_disk
    disk = output + max([p.disk_bytes for p in plans] + [0]) + sum(p.after.bytes_on_disk for p in plans[:-1])
    probe = dest.resolve().parent
    while not probe.exists():
        probe = probe.parent
    return Plan(
        recipe.model, base, plans, output, disk, shutil.disk_usage(probe).free, psutil.virtual_memory().available, notes
    )


def check(plan: Plan) -> None:
    """Refuse a plan the machine cannot hold, before anything heavy runs."""
    if plan.disk_bytes > plan.disk_free:
        raise UsageError(
            f"not enough disk for this run: it needs about {plan.disk_bytes / MB:,.0f} MiB, {plan.disk_free / MB:,.0f} "
            f"MiB are free"
        )
    if plan.peak_bytes > plan.memory_available:
        raise UsageError(
            f"not enough memory for this run: its peak is about {plan.peak_bytes / MB:,.0f} MiB, "
            f"{plan.memory_available / MB:,.0f} MiB are available (lower samples, seq_len or batch_size)"
        )


def table(plan: Plan):
    from rich.table import Table

    t = Table(
        title=f"plan for {plan.model} ({plan.base.params / 1e6:.1f}M parameters, {plan.base.bytes_on_disk / MB:.0f} "
        f"MiB)",
        title_justify="left",
    )
    for col in ("stage", "time (est.)", "peak memory (est.)", "parameters after", "weights after"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for s in plan.stages:
        t.add_row(
            s.name,
            secs(s.seconds),
            f"{s.peak_bytes / MB:,.0f} MiB",
            f"{s.after.params / 1e6:.1f}M",
            f"{s.after.bytes_on_disk / MB:,.1f} MiB",
        )
    return t


def secs(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"
