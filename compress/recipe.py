"""Recipes: what to do to a model, as strict pydantic models with YAML in and out.

Every CLI command builds a `Recipe` and hands it to `compress.api.run`, so any command
can be written down (OUT/recipe.yaml) and replayed with `compress run`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from compress.distill import trainer
from compress.errors import UsageError
from compress.method import Method
from compress.models.compute import half_is_fast
from compress.primitives.masks import parse_pattern
from compress.prune import table as prune_table
from compress.quant import table as quant_table
from compress.quant.schemes import MIXED_WIDTHS, SCHEMES

SCHEME_NAMES = tuple(SCHEMES)
TRAIN = {f.name: f.default for f in dataclasses.fields(trainer.Options) if f.default is not dataclasses.MISSING}
DISTILL_STEPS = 100  # optimizer steps when neither steps nor tokens are given

GroupSize = Union[int, Literal["auto", "channel"]]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MethodStage(Strict):
    """A stage whose `method` names a row of a method table: the table's options sit flat in
    the stage (`with_options`), each checked by its own model, and belong to their method."""

    METHODS: ClassVar[dict[str, type[Method]]] = {}
    stage: str
    method: str  # a name in METHODS (`with_options` makes it a Literal of them)

    @property
    def method_class(self) -> type[Method]:
        return self.METHODS[self.method]

    @property
    def reads_text(self) -> bool:
        return self.method_class.calibrated

    def method_options(self) -> BaseModel:
        cls = self.method_class.Options
        return cls(**{k: getattr(self, k) for k in cls.model_fields})

    @classmethod
    def _owners(cls, field: str) -> list[str]:
        return [n for n, m in cls.METHODS.items() if field in m.Options.model_fields]

    @model_validator(mode="after")
    def _options_of_method(self) -> MethodStage:
        foreign = [
            f
            for f in self.model_fields_set
            if (owners := self._owners(f))
            and self.method not in owners
            and getattr(self, f) != type(self).model_fields[f].default
        ]
        if foreign:
            owners = sorted({o for f in foreign for o in self._owners(f)})
            raise ValueError(
                f"{', '.join(sorted(foreign))}: options that belong to method {' or '.join(owners)}, not {self.method}"
            )
        self.method_class.check(self)
        return self

    @model_serializer(mode="wrap")
    def _only_own_options(self, handler):
        """Written recipes hold the options of their own method only."""
        data = handler(self)
        return {k: v for k, v in data.items() if not (owners := self._owners(k)) or self.method in owners}


def with_options(base: type[MethodStage], methods: dict[str, type[Method]], default: str | None) -> type[MethodStage]:
    """`base` with a `method` field naming a row of `methods` and every method's option fields."""
    fields: dict[str, Any] = {}
    for m in methods.values():
        for name, info in m.Options.model_fields.items():
            if name in fields and repr(fields[name][1]) != repr(info):
                raise TypeError(f"option {name!r} is declared by two methods; share one options class")
            fields[name] = (info.annotation, info)
    choice = Literal[tuple(methods)]  # type: ignore[valid-type]
    method = (choice, default) if default is not None else (choice, ...)
    return create_model(
        base.__name__.replace("Base", "Stage"),
        __base__=base,
        __module__=__name__,
        METHODS=(ClassVar[dict[str, type[Method]]], methods),
        method=method,
        **fields,
    )


class QuantizeBase(MethodStage):
    stage: Literal["quantize"] = "quantize"
    scheme: Literal[SCHEME_NAMES]  # type: ignore[valid-type]
    # None: the scheme's default (128 for w4a16, per channel otherwise).
    group_size: GroupSize | None = None
    # None: the scheme's default (schemes.symmetric_for: zero points for 4 bits and fewer, except experts).
    symmetric: bool | None = None
    # Choose each group's range to minimize the weight's squared error (else min/max).
    range_search: bool = True
    # Calibration (methods that read data): text, and how many windows of how many tokens.
    dataset: str = "builtin"
    text_column: str = "text"
    samples: int = Field(64, ge=1)
    seq_len: int = Field(512, ge=16)
    # Module name patterns left unquantized, in addition to lm_head and embeddings.
    # A plain name matches that module; "re:<regex>" matches by regular expression.
    ignore: list[str] = Field(default_factory=list)
    # Mixed precision (quant/mixed.py): the average stored bits a weight of the decoder layers' linears, scales
    # and zero points included, met by giving each linear one of `bit_widths` (group size and symmetry: the
    # scheme's). None: every linear on the scheme's width.
    target_bits: float | None = Field(None, gt=1, le=9)
    bit_widths: list[int] = Field(default_factory=lambda: list(MIXED_WIDTHS))

    @model_validator(mode="after")
    def _mixed_needs_integers(self) -> QuantizeBase:
        kind = SCHEMES[self.scheme]
        if self.target_bits is not None and (kind.act or kind.grid != "int"):
            raise ValueError(f"target_bits mixes integer weight widths; {self.scheme} is not a weight-only int scheme")
        return self

    @field_validator("bit_widths")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if len(set(v)) < 2 or not all(2 <= b <= 8 for b in v):
            raise ValueError(f"bit widths: at least two of 2 to 8, got {v}")
        return sorted(set(v))

    @model_validator(mode="before")
    @classmethod
    def _scheme_defaults(cls, data: Any) -> Any:
        """A stage that names no method gets its scheme's (compress/quant/schemes.py), so a written recipe holds
        what ran."""
        if isinstance(data, dict) and data.get("scheme") in SCHEMES and data.get("method") is None:
            data = {**data, "method": SCHEMES[data["scheme"]].default_method}
        return data

    @field_validator("group_size")
    @classmethod
    def _positive(cls, v: GroupSize | None) -> GroupSize | None:
        if isinstance(v, int) and (v < 1 or v & (v - 1)):
            raise ValueError(f"group size must be a power of two, got {v}")
        return v


class PruneBase(MethodStage):
    stage: Literal["prune"] = "prune"
    # Unstructured methods: share of each linear's weights set to zero, and the pattern
    # ("unstructured", or "N:M": N weights kept of every M consecutive inputs; sets the share).
    sparsity: float = Field(0.5, gt=0, lt=1)
    pattern: str = "unstructured"
    # dense: plain transformers loads it; sparse: bitmask + values, smaller, read by compress.
    storage: Literal["dense", "sparse"] = "dense"
    # Calibration (methods that read data).
    dataset: str = "builtin"
    text_column: str = "text"
    samples: int = Field(64, ge=1)
    seq_len: int = Field(512, ge=16)
    ignore: list[str] = Field(default_factory=list)  # linears left dense (lm_head always is)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        parse_pattern(v)  # a ValueError names what is wrong
        return v

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def share(self) -> float:
        """The share of weights pruned (N:M sets it)."""
        return 1 - self.nm[0] / self.nm[1] if self.nm else self.sparsity


QuantizeStage = with_options(QuantizeBase, quant_table.METHODS, default=None)  # None: the scheme's
PruneStage = with_options(PruneBase, prune_table.METHODS, default=None)


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
    lr: float = Field(TRAIN["lr"], gt=0, le=1)
    warmup: float = Field(0.05, ge=0, lt=1)  # share of the steps spent warming up, then cosine decay
    weight_decay: float = Field(TRAIN["weight_decay"], ge=0)
    max_grad_norm: float = Field(TRAIN["max_grad_norm"], ge=0)  # 0: no clipping
    # Losses: logit divergence on temperature-softened logits, hidden-state matching
    # (student layer -> teacher layer, mapped automatically), next-token loss.
    loss: Literal["kl", "reverse-kl", "jsd"] = TRAIN["loss"]
    temperature: float = Field(TRAIN["temperature"], gt=0)
    kd_weight: float = Field(TRAIN["kd_weight"], ge=0)
    hidden_weight: float = Field(TRAIN["hidden_weight"], ge=0)
    hidden_loss: Literal["mse", "cosine"] = TRAIN["hidden_loss"]
    lm_weight: float = Field(TRAIN["lm_weight"], ge=0)
    train_embeddings: bool = False  # token embeddings (and a tied output layer) stay fixed unless set
    autocast: Literal["auto", "bf16", "off"] = "auto"  # auto: bfloat16 where it multiplies faster (GPU or CPU)
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(TRAIN["checkpoint_every"], ge=1)  # steps between resumable checkpoints
    seed: int = TRAIN["seed"]
    dataset: str = "builtin"  # training text; built-in: the calibration half, never the evaluation half
    text_column: str = "text"
    # Windows of training text: None reads all a text holds, and samples as many windows of `generated` text
    # (alone or in a mix) as the run reads.
    samples: int | None = Field(None, ge=1)

    reads_text: ClassVar[bool] = True  # its training text

    @field_validator("autocast", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        """YAML reads an unquoted `off` as false (and `on` as true)."""
        return {False: "off", True: "bf16"}.get(v, v) if isinstance(v, bool) else v

    def bf16(self, device: str) -> bool:
        """Whether training runs under bfloat16 autocast on `device`: as asked, else (auto) where bfloat16 multiplies
        faster (compute.half_is_fast: a GPU that has it, a CPU measured >= 1.3x float32). On 2 AMD EPYC cores a
        SmolLM2 step takes 1.6x less time than float32's (benchmarks/distill_speed.py)."""
        return self.autocast == "bf16" or self.autocast == "auto" and half_is_fast(torch.bfloat16, device)

    def total_steps(self, windows_per_step: int) -> int:
        """Optimizer steps: as given, from the training tokens, or DISTILL_STEPS."""
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return max(1, -(-self.tokens // (windows_per_step * self.seq_len)))
        return DISTILL_STEPS

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
    # Decoders: more evaluation texts, each scored as `dataset` is (perplexity, divergence), e.g. [licenses]: text
    # of another domain than the calibration's, where a method that fits its calibration text too closely shows it.
    also: list[str] = []
    seq_len: int = Field(512, ge=16)
    max_tokens: int = Field(8192, ge=64)  # perplexity: tokens scored
    # Decoders: KL divergence and top-1 agreement of the result's next-token distributions against
    # the base's on the perplexity windows (the base is loaded beside the result: two more forward passes).
    kl_divergence: bool = True
    max_texts: int = Field(256, ge=4)  # encoders: sentences embedded
    latency: bool = True
    prompt_len: int = Field(128, ge=1)
    new_tokens: int = Field(32, ge=1)
    latency_rounds: int = Field(5, ge=3)  # interleaved with the base's; the ratio is their median
    tasks: list[str] = []  # lm-eval tasks (compress[eval]), e.g. [everyday_facts] (shipped) or [hellaswag]
    task_limit: int | None = Field(None, ge=1)  # questions per task (None: all)
    # Read back the base's untimed measurement from an earlier run of the same weights, text,
    # settings, libraries and threads (~/.cache/compress/measurements) instead of measuring again.
    reuse_base: bool = True


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(v: Any) -> int:
    """4096, "512MiB", "1.5GB" -> bytes."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"expected a size such as 2GiB or 500MB, got {v!r}")
    if isinstance(v, str):
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
    max_kl_divergence: float | None = Field(None, ge=0)  # decoders: mean KL(base || result), nats per token
    min_embedding_similarity: float | None = Field(None, ge=-1, le=1)  # encoders: mean cosine to the base
    max_size_ratio: float | None = Field(None, gt=0)  # bytes on disk, result / base
    min_speedup: float | None = Field(None, gt=0)  # decode tokens/s (prefill for encoders), result / base
    max_peak_memory: int | None = None  # bytes (or "2GiB"): peak memory of the result loaded and evaluated
    max_task_drop: float | None = Field(None, ge=0)  # accuracy points (0-100) lost on the worst evaluate.tasks task

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
        if g.max_task_drop is not None and not ev.tasks:
            raise ValueError("gates.max_task_drop needs evaluate.tasks (e.g. [everyday_facts])")
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
                try:
                    node[idx] = yaml.safe_load(raw)
                except yaml.YAMLError as exc:
                    problem = getattr(exc, "problem", exc)
                    raise UsageError(f"--set {key}: the value is not valid YAML ({problem})") from None
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
        errors = exc.errors()
        bad_schemes = {e["loc"][:-1] for e in errors if e["loc"][-1:] == ("scheme",)}
        for err in errors:
            unnamed = err["type"] == "missing" or err["input"] is None
            if err["loc"][-1:] == ("method",) and unnamed and err["loc"][:-1] in bad_schemes:
                continue  # no method given: the default follows the scheme, whose own error says it all
            loc = tuple(p for p in err["loc"] if p not in ("quantize", "prune", "distill"))
            where = ".".join(str(p) for p in loc) or "(top)"
            line = _line_of(root, loc)
            at = f"{source}:{line}: " if line else f"{source}: "
            msgs.append(f"{at}{where}: {err['msg']}")
        raise UsageError("; ".join(msgs)) from None


def load(path: Path, overrides: list[str] | None = None) -> Recipe:
    if not path.is_file():
        raise UsageError(f"recipe not found: {path}")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text file (a recipe is YAML)") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the recipe ({exc.strerror})") from None
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
