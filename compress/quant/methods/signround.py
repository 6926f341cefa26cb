"""SignRound (Cheng et al., 2023, arXiv 2309.05516, "Optimize weight rounding via signed gradient
descent"): per decoder layer, learn each weight's rounding offset v in [-0.5, 0.5] and each
group's range multipliers by signed gradient descent on the layer's output error, its inputs being
the calibration batches as the already quantized layers produce them. The target is the float
layer's outputs on those inputs; `--signround-target model` aims at the unchanged model's hidden
state after the layer instead (as auto-round's `enable_quanted_input`), so each layer also makes
up for the error of those before it: closer on text like the calibration's, not on other text
(measured: see the option's comment).

A weight is stored as q = clamp(round(w / s + v) + z, qmin, qmax) with the group's scale s and
zero point z taken from its range [min(w, 0) * a, max(w, 0) * b]; v, a and b are what is learnt
(rounding through a straight-through estimator), so the result is plain integers and scales.
The multipliers start where the activation-weighted range search puts them (v = 0 is that
search's round to nearest), and a layer keeps its tuned weights only when they reach its target
on all the calibration batches better than that start did.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from compress.calibrate import Layer, LayerInputs
from compress.data.calibration import CALIBRATION_BATCH
from compress.models.compute import half_is_fast
from compress.primitives.qparams import Grid, default_ratios, grouped, range_to_grid, search_ratio
from compress.quant.method import Quantized, QuantMethod
from compress.quant.schemes import SCHEMES

LOWEST_RATIO = 0.5  # a group's range may shrink to half its min/max, as the range search never goes below 0.7


class SignRoundOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    signround_steps: int = Field(
        200, ge=1, le=100_000, description="SignRound: signed-gradient steps per decoder layer"
    )
    signround_lr: float | None = Field(
        None, gt=0, le=1, description="SignRound: step size, decaying linearly to 0 (default: 1 / steps)"
    )
    signround_batch: int = Field(
        8, ge=1, description="SignRound: calibration samples per step (whole calibration batches of 4)"
    )
    # SmolLM2 w4a16 g64, 16 samples, 50 steps of 4 (benchmarks/RESULTS.md): "model" +5.7% / KL 0.075 on held-out
    # pages like the calibration's, +22.5% / 0.292 on license texts; "layer" +8.4% / 0.113 and +18.5% / 0.279.
    # w3a16 g64 (same settings, symmetric): "model" +18.6% / 0.207 and +56.3% / 0.638, "layer" +22.8% / 0.286 and
    # +56.0% / 0.679 (auto-round 0.16: +18.7% / 0.213, +62.8% / 0.664). Hence the default: "model" below 4 bits
    signround_target: Literal["layer", "model"] | None = Field(
        None,
        description="SignRound: each layer's outputs are tuned towards the float layer's outputs on the already "
        "quantized layers' outputs (layer), or towards the unchanged model's hidden states (model: closer on text "
        "like the calibration's; off it, better at 3 bits and worse at 4); default: model below 4 bits, else layer "
        "(awq+signround: model)",
    )
    signround_seed: int = Field(
        0, ge=0, description="SignRound: seeds the order in which the steps take the calibration batches"
    )
    # SmolLM2 awq+signround w4a16 g64, 16 samples, 50 steps of 4, one run on 2 AVX512-BF16 cores (RESULTS.md, "bfloat16
    # steps"): 481 s against float32's 632 s (auto-round 0.16.1, which tunes in bfloat16 on CPUs too: 352 s). Two batch
    # orders: held-out pages +3.7% / +3.9%, KL 0.055 both; license texts +15.6% / +17.7%, KL 0.202 / 0.217; float32
    # steps +3.5% / +3.7%, 0.055; +11.5% / +16.6%, 0.199 / 0.212: within the orders' spread
    signround_bf16: bool | None = Field(
        None,
        description="SignRound: the steps' matmuls in bfloat16 (autocast, as auto-round tunes); the targets, the "
        "check against the start and the stored values stay float32; default: where bfloat16 multiplies faster than "
        "float32 (a GPU; a CPU with AVX512-BF16 or AMX, measured once per process)",
    )


def bf16_steps(options: SignRoundOptions, device: str) -> bool:
    """Whether the steps multiply in bfloat16 on `device`: the option's, else where bfloat16 is faster."""
    return half_is_fast(torch.bfloat16, device) if options.signround_bf16 is None else options.signround_bf16


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, with the identity's gradient."""
    return x + (x.round() - x).detach()


def tuned_quantize(
    wg: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, grid: Grid, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """wg [O, G, g] float32, offsets v [O, G, g], range multipliers lo, hi [O, G] ->
    de-quantized weights [O, G, g], integers [O, G, g], scale and zero point [O, G] (float32
    holding the stored values: the scale is rounded to `scale_dtype`). Differentiable in v, lo, hi."""
    low = wg.amin(-1).clamp(max=0) * lo  # 0 stays representable
    high = wg.amax(-1).clamp(min=0) * hi
    scale, zp = range_to_grid(low, high, grid, rounding=round_ste)
    eps = torch.finfo(scale_dtype).eps  # symmetric int scales carry the sign of their group's extreme (qparams)
    scale = torch.where(scale < 0, scale.clamp(max=-eps), scale.clamp(min=eps))
    scale = scale + (scale.to(scale_dtype).float() - scale).detach()  # as stored
    q = (round_ste(wg / scale[..., None] + v) + zp[..., None]).clamp(grid.qmin, grid.qmax)
    return (q - zp[..., None]) * scale[..., None], q, scale, zp


class _Rounding:
    """One linear's learnable rounding: its weights in groups and the parameters being learnt."""

    def __init__(self, w: torch.Tensor, ratio: torch.Tensor, grid: Grid, keep_zeros: bool, dtype: torch.dtype):
        """dtype: the scales' (the stored dtype)."""
        self.shape, self.dtype, self.grid = w.shape, dtype, grid
        self.wg = grouped(w.detach().float(), grid.group_size)  # [O, G, g]
        self.mask = (self.wg != 0).float() if keep_zeros else None  # zeros stay zeros (a pruned model)
        self.v = torch.zeros_like(self.wg, requires_grad=True)
        self.lo = ratio.float().clone().requires_grad_(True)
        # a symmetric grid has one range: both ends scale by `lo`
        self.hi = self.lo if grid.symmetric else ratio.float().clone().requires_grad_(True)
        self.top = float(default_ratios(grid).max())  # the widest range the search tries (its unclipped end)

    def params(self) -> list[torch.Tensor]:
        return [self.v, self.lo] if self.grid.symmetric else [self.v, self.lo, self.hi]

    def state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params()]

    def load(self, state: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.params(), state):
                p.copy_(s)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        v = self.v if self.mask is None else self.v * self.mask
        w, q, scale, zp = tuned_quantize(self.wg, v, self.lo, self.hi, self.grid, self.dtype)
        return w.reshape(self.shape), q, scale, zp

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """A signed gradient step; offsets and multipliers stay in their ranges."""
        self.v.sub_(lr * self.v.grad.sign()).clamp_(-0.5, 0.5)
        for r in self.params()[1:]:
            r.sub_(lr * r.grad.sign()).clamp_(LOWEST_RATIO, self.top)
        for p in self.params():
            p.grad = None

    @torch.no_grad()
    def result(self) -> Quantized:
        _, q, scale, zp = self.forward()
        return q.reshape(self.shape).to(torch.int8), scale.to(self.dtype), zp.to(torch.int8)


def _float(value):
    """Calibration kwargs (masks, rotary tables) in float32, as the tuned copy of the layer runs."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    if isinstance(value, tuple):
        return tuple(_float(v) for v in value)
    return value


def tune_layer(
    block: torch.nn.Module,
    roundings: dict[str, _Rounding],
    inputs: LayerInputs,
    steps: int,
    lr: float,
    batch: int,
    half: torch.dtype | None = None,
    seed: int = 0,
) -> dict[str, Quantized]:
    """Learn every rounding of one decoder layer (`block`: a float32 copy) run on `inputs.hidden`,
    towards `inputs.reference` (else the float layer's own outputs on those inputs); returns each
    linear's integers, scale and zero point. half: the steps' matmuls in this dtype (autocast); the
    targets and the check against the start stay float32. seed: the order of the batches."""
    hidden = [h.float() for h in inputs.hidden]
    kwargs = [{k: _float(v) for k, v in kw.items()} for kw in inputs.kwargs]

    def run(h: torch.Tensor, kw: dict, weights: dict[str, torch.Tensor] | None) -> torch.Tensor:
        out = torch.func.functional_call(block, weights or {}, (h,), kw, strict=False)
        return out[0] if isinstance(out, tuple) else out

    def weights() -> dict[str, torch.Tensor]:
        return {f"{n}.weight": r.forward()[0] for n, r in roundings.items()}

    with torch.no_grad():
        if inputs.reference is not None:  # the unchanged model's hidden states: upstream error is corrected too
            refs = [r.float() for r in inputs.reference]
        else:
            refs = [run(h, kw, None) for h, kw in zip(hidden, kwargs)]

    def full_loss() -> float:
        with torch.no_grad():
            w = weights()
            return sum(float((run(h, kw, w) - r).pow(2).sum()) for h, kw, r in zip(hidden, kwargs, refs))

    start = full_loss()
    initial = {n: r.state() for n, r in roundings.items()}
    per_step = max(1, math.ceil(batch / hidden[0].shape[0]))  # whole calibration batches
    order = torch.randperm(len(hidden), generator=torch.Generator().manual_seed(seed)).tolist()
    for step in range(steps):
        picks = [order[(step * per_step + k) % len(order)] for k in range(min(per_step, len(order)))]
        with torch.autocast(hidden[0].device.type, dtype=half) if half else contextlib.nullcontext():
            w = weights()
            outs = [run(hidden[i], kwargs[i], w) for i in picks]
        loss = sum((out.float() - refs[i]).pow(2).mean() for out, i in zip(outs, picks)) / len(picks)
        loss.backward()
        for r in roundings.values():
            r.step(lr * (1 - step / steps))
    if full_loss() >= start:  # not better than where it started: keep the range-searched rounding
        for n, r in roundings.items():
            r.load(initial[n])
    return {n: r.result() for n, r in roundings.items()}


class SignRound(QuantMethod):
    name = "signround"
    Options = SignRoundOptions
    working_memory = 1.5  # a float32 copy of one layer, its activations for a step's batches
    # `--dry-run`: one step over a sample, in forwards of that sample's linears (plan.forward_seconds), attention and
    # autograd included; fitted on SmolLM2 (16 samples, 50 steps of 4, 2 cores): awq+signround w4a16 481 s and
    # signround w3a16 441 s with bfloat16 steps (4.75 and 4.3), 613-632 s and 704 s with float32 steps (6.2, 7.1)
    STEP_COST = 4.5
    FLOAT32_STEPS = 1.45  # float32 steps' time over bfloat16 steps' (the same runs)

    LOW_BITS = 3  # this width and below aim at the model's hidden states by default (the option's comment)

    @property
    def aim(self) -> Literal["layer", "model"]:
        """The target in force: the option's, else by the scheme's width."""
        return self.options.signround_target or ("model" if self.target.grid.bits <= self.LOW_BITS else "layer")

    @property
    def float_stream(self) -> bool:
        return self.aim == "model"

    @property
    def lr(self) -> float:
        return self.options.signround_lr or 1 / self.options.signround_steps

    @property
    def bf16(self) -> bool:
        return bf16_steps(self.options, self.target.device)

    def settings(self) -> dict:
        return {
            **self.options.model_dump(),
            "signround_lr": self.lr,
            "signround_target": self.aim,
            "signround_bf16": self.bf16,
        }

    @classmethod
    def check(cls, stage) -> None:
        if SCHEMES[stage.scheme].grid != "int":
            raise ValueError(
                f"signround learns the rounding onto an integer grid; {stage.scheme} has none (use gptq or rtn)"
            )

    @classmethod
    def time_multiple(cls, stage) -> float:
        o = stage.method_options()
        batch = min(stage.samples, math.ceil(o.signround_batch / CALIBRATION_BATCH) * CALIBRATION_BATCH)  # as tuned
        cost = cls.STEP_COST * (1 if bf16_steps(o, "cpu") else cls.FLOAT32_STEPS)  # plans time CPUs
        return 3 + cost * o.signround_steps * batch / stage.samples  # + references and both full losses

    def quantize_layer(self, model: torch.nn.Module, layer: Layer, inputs: LayerInputs) -> dict[str, Quantized] | None:
        o = self.options
        roundings = {}
        for name, lin in layer.targets.items():
            grid = self.target.grid_of([lin])  # mixed precision: each linear its own width
            dtype = self.target.scale_dtype(lin.weight)
            if self.target.range_search:
                ratio = search_ratio(lin.weight, grid, dtype, importance=layer.stats[name].mean_square())
            else:
                ratio = torch.ones(lin.out_features, lin.in_features // (grid.group_size or lin.in_features))
            roundings[name] = _Rounding(lin.weight, ratio.to(lin.weight.device), grid, self.target.keep_zeros, dtype)
        block = copy.deepcopy(layer.module).float()
        block.requires_grad_(False)
        with torch.enable_grad():
            half = torch.bfloat16 if self.bf16 else None
            return tune_layer(
                block, roundings, inputs, o.signround_steps, self.lr, o.signround_batch, half, o.signround_seed
            )
