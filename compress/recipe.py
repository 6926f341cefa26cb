"""Recipes: what to do to a model, as strict pydantic models with YAML in and out.

Every CLI command builds a `Recipe` and hands it to `compress.api.run`, so any command
can be written down (OUT/recipe.yaml) and replayed with `compress run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compress.errors import UsageError

SCHEMES = ("w4a16", "w8a16", "w8a8", "fp8")
Scheme = Literal["w4a16", "w8a16", "w8a8", "fp8"]
GroupSize = Union[int, Literal["auto", "channel"]]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class QuantizeStage(Strict):
    stage: Literal["quantize"] = "quantize"
    scheme: Scheme
    method: Literal["rtn", "gptq", "awq", "smoothquant+gptq", "smoothquant+rtn"] = "rtn"
    # None: the scheme's default (128 for w4a16, per channel otherwise).
    group_size: GroupSize | None = None
    symmetric: bool = True
    # Choose each group's range to minimize the weight's squared error (else min/max).
    range_search: bool = True
    # Calibration (every method but rtn): text, and how many windows of how many tokens.
    dataset: str = "builtin"
    text_column: str = "text"
    samples: int = Field(64, ge=1)
    seq_len: int = Field(512, ge=16)
    # GPTQ: Hessian dampening (fraction of its mean diagonal), columns per lazy update,
    # columns in order of decreasing Hessian diagonal.
    dampening: float = Field(0.01, gt=0, le=1)
    block_size: int = Field(128, ge=1)
    actorder: bool = False
    # AWQ: scale candidates searched; SmoothQuant: migration strength (None: searched
    # per smoothing group for the least quantized output error).
    awq_grid: int = Field(20, ge=1)
    alpha: float | None = Field(None, ge=0, le=1)
    # Module name patterns left unquantized, in addition to lm_head and embeddings.
    # A plain name matches that module; "re:<regex>" matches by regular expression.
    ignore: list[str] = Field(default_factory=list)

    @field_validator("group_size")
    @classmethod
    def _positive(cls, v: GroupSize | None) -> GroupSize | None:
        if isinstance(v, int) and (v < 1 or v & (v - 1)):
            raise ValueError(f"group size must be a power of two, got {v}")
        return v


class PruneStage(Strict):
    stage: Literal["prune"] = "prune"
    method: Literal["magnitude", "wanda", "sparsegpt", "structured"]
    # Unstructured methods: share of each linear's weights set to zero, and the pattern
    # ("unstructured", or "N:M": N weights kept of every M consecutive inputs; sets the share).
    sparsity: float = Field(0.5, gt=0, lt=1)
    pattern: str = "unstructured"
    # dense: plain transformers loads it; sparse: bitmask + values, smaller, read by compress.
    storage: Literal["dense", "sparse"] = "dense"
    # Structured: layers to drop (how many, chosen by importance, or which), and the share
    # of MLP channels and of query heads to keep.
    drop_layers: int | list[int] | None = None
    mlp_keep: float | None = Field(None, gt=0, le=1)
    heads_keep: float | None = Field(None, gt=0, le=1)
    # Calibration (wanda, sparsegpt, structured).
    dataset: str = "builtin"
    text_column: str = "text"
    samples: int = Field(64, ge=1)
    seq_len: int = Field(512, ge=16)
    dampening: float = Field(0.01, gt=0, le=1)  # SparseGPT: as GPTQ's
    block_size: int = Field(128, ge=8)  # SparseGPT: columns per lazy update (mask chosen per block)
    ignore: list[str] = Field(default_factory=list)  # linears left dense (lm_head always is)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        from compress.primitives.masks import parse_pattern

        try:
            parse_pattern(v)
        except UsageError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("drop_layers")
    @classmethod
    def _drop(cls, v: int | list[int] | None) -> int | list[int] | None:
        if isinstance(v, int) and v < 1:
            raise ValueError("drop_layers must be at least 1 (or a list of layer indices)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PruneStage:
        structured_opts = self.drop_layers is not None or self.mlp_keep is not None or self.heads_keep is not None
        if self.method == "structured":
            if not structured_opts:
                raise ValueError("structured pruning needs drop_layers, mlp_keep or heads_keep")
            if self.pattern != "unstructured" or self.storage != "dense":
                raise ValueError("structured pruning takes no pattern or sparse storage: the tensors themselves shrink")
        elif structured_opts:
            raise ValueError(f"drop_layers, mlp_keep and heads_keep belong to method structured, not {self.method}")
        return self


class DistillStage(Strict):
    stage: Literal["distill"] = "distill"
    # The teacher: a model spec as for `model`; None: the recipe's model as loaded, before
    # any stage (so prune -> distill heals the pruned model from the original).
    teacher: str | None = None
    # Length: optimizer steps, or training tokens (steps = tokens / tokens per step).
    steps: int | None = Field(None, ge=1)
    tokens: int | None = Field(None, ge=1)
    seq_len: int = Field(256, ge=16)
    batch_size: int = Field(4, ge=1)  # windows per micro-batch, per process
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0, le=1)
    warmup: float = Field(0.05, ge=0, lt=1)  # share of the steps spent warming up, then cosine decay
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0: no clipping
    # Losses: logit divergence on temperature-softened logits, hidden-state matching
    # (student layer -> teacher layer, mapped automatically), next-token loss.
    loss: Literal["kl", "reverse-kl", "jsd"] = "kl"
    temperature: float = Field(1.0, gt=0)
    kd_weight: float = Field(1.0, ge=0)
    hidden_weight: float = Field(0.0, ge=0)
    hidden_loss: Literal["mse", "cosine"] = "mse"
    lm_weight: float = Field(1.0, ge=0)
    train_embeddings: bool = False  # token embeddings (and a tied output layer) stay fixed unless set
    autocast: Literal["auto", "bf16", "off"] = "auto"  # auto: bfloat16 on GPUs that have it
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(50, ge=1)  # steps between resumable checkpoints
    seed: int = 0
    dataset: str = "builtin"  # training text; built-in: the calibration half, never the evaluation half
    text_column: str = "text"

    @model_validator(mode="after")
    def _length(self) -> DistillStage:
        if self.steps is not None and self.tokens is not None:
            raise ValueError("give steps or tokens, not both")
        if self.kd_weight == 0 and self.hidden_weight == 0 and self.lm_weight == 0:
            raise ValueError("every loss weight is 0: nothing to train on")
        return self


Stage = Annotated[Union[QuantizeStage, PruneStage, DistillStage], Field(discriminator="stage")]


class EvalSpec(Strict):
    enabled: bool = True
    # "builtin" (text shipped with Python) or a dataset: local .txt/.jsonl/.parquet
    # file or folder, or a datasets hub name.
    dataset: str = "builtin"
    text_column: str = "text"
    seq_len: int = Field(512, ge=16)
    max_tokens: int = Field(8192, ge=64)  # perplexity: tokens scored
    max_texts: int = Field(256, ge=4)  # encoders: sentences embedded
    latency: bool = True
    prompt_len: int = Field(128, ge=1)
    new_tokens: int = Field(32, ge=1)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(v: Any) -> int:
    """4096, "512MiB", "1.5GB" -> bytes."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"expected a size such as 2GiB or 500MB, got {v!r}")
    if isinstance(v, str):
        import re

        m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", v)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"expected a size such as 2GiB or 500MB, got {v!r}")
        v = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if v <= 0:
        raise ValueError("a size must be positive")
    return int(v)


class Gates(Strict):
    """Budgets the result must meet; `compress run` exits 1 when one is missed."""

    max_ppl_increase: float | None = Field(None, ge=0)  # relative: 0.05 = at most 5% above the base
    min_embedding_similarity: float | None = Field(None, ge=-1, le=1)  # encoders: mean cosine to the base
    max_size_ratio: float | None = Field(None, gt=0)  # bytes on disk, result / base
    min_speedup: float | None = Field(None, gt=0)  # decode tokens/s (prefill for encoders), result / base
    max_peak_memory: int | None = None  # bytes (or "2GiB"): peak memory of the result loaded and evaluated

    @field_validator("max_peak_memory", mode="before")
    @classmethod
    def _bytes(cls, v: Any) -> int | None:
        return None if v is None else parse_bytes(v)

    def any(self) -> bool:
        return any(v is not None for v in self.model_dump().values())


class Data(Strict):
    """Default texts for the stages and the evaluation; a stage's own `dataset` wins."""

    calibration: str = "builtin"
    training: str = "builtin"
    evaluation: str = "builtin"
    text_column: str = "text"


class Recipe(Strict):
    version: Literal[1] = 1
    model: str
    output: str | None = None
    overwrite: bool = False
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: Literal["cpu", "cuda"] = "cpu"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    offload: bool = False  # decoder layers stay on disk: read one at a time, written once quantized
    data: Data = Field(default_factory=Data)
    stages: list[Stage] = Field(min_length=1)
    evaluate: EvalSpec = Field(default_factory=EvalSpec)
    gates: Gates = Field(default_factory=Gates)

    @model_validator(mode="before")
    @classmethod
    def _data_defaults(cls, raw: Any) -> Any:
        """Stages and evaluation without their own dataset read the recipe's `data`."""
        if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
            return raw
        data, raw = raw["data"], dict(raw)
        column = data.get("text_column")
        stages = []
        for st in raw.get("stages") or []:
            if isinstance(st, dict):
                st = dict(st)
                key = "training" if st.get("stage") == "distill" else "calibration"
                if "dataset" not in st and key in data:
                    st["dataset"] = data[key]
                if "text_column" not in st and column:
                    st["text_column"] = column
            stages.append(st)
        if "stages" in raw:
            raw["stages"] = stages
        ev = raw.get("evaluate") or {}
        if isinstance(ev, dict):
            ev = dict(ev)
            if "dataset" not in ev and "evaluation" in data:
                ev["dataset"] = data["evaluation"]
            if "text_column" not in ev and column:
                ev["text_column"] = column
            raw["evaluate"] = ev
        return raw

    @model_validator(mode="after")
    def _gates_measurable(self) -> Recipe:
        g, ev = self.gates, self.evaluate
        if g.any() and not ev.enabled:
            raise ValueError("gates need measurements: set evaluate.enabled: true")
        if g.min_speedup is not None and not ev.latency:
            raise ValueError("gates.min_speedup needs evaluate.latency: true")
        return self

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude={"output", "overwrite"})
        return yaml.safe_dump(data, sort_keys=False)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.0.c=value` overrides (value parsed as YAML) to a recipe dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        parts = key.split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise UsageError(f"--set {key}: no list item {part!r}")
                idx: Any = int(part)
            elif isinstance(node, dict):
                idx = part
            else:
                raise UsageError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping or list")
            if last:
                node[idx] = yaml.safe_load(raw)
            else:
                if isinstance(node, dict) and idx not in node:
                    node[idx] = {}
                node = node[idx]
    return data


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of the YAML node at a pydantic error location, if found."""
    node, line = root, None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(key)]
            if not match:
                break
            node = match[0][1]
            line = match[0][0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        elif not isinstance(key, int):  # discriminated-union tag in the location
            continue
        else:
            break
    return line


def validate(data: Any, source: str = "recipe", yaml_text: str | None = None) -> Recipe:
    """Validate a recipe dict; errors name the field (and the line, given the YAML)."""
    if not isinstance(data, dict):
        raise UsageError(f"{source}: a recipe must be a YAML mapping")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        root = yaml.compose(yaml_text) if yaml_text else None
        msgs = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if p not in ("quantize", "prune", "distill"))
            where = ".".join(str(p) for p in loc) or "(top)"
            line = _line_of(root, loc)
            at = f"{source}:{line}: " if line else f"{source}: "
            msgs.append(f"{at}{where}: {err['msg']}")
        raise UsageError("; ".join(msgs)) from None


def load(path: Path, overrides: list[str] | None = None) -> Recipe:
    if not path.is_file():
        raise UsageError(f"recipe not found: {path}")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UsageError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if overrides:
        data = apply_overrides(data if isinstance(data, dict) else {}, overrides)
        text = None  # line numbers no longer match the file
    return validate(data, str(path), text)
