"""AWQ's scales, then SignRound's tuned rounding: each norm's per-channel scale is folded into the
linears it feeds first (AWQ's search, `awq.py`), and SignRound (`signround.py`) then learns the
rounding of the scaled weights. The scales give the grid a per-input-channel resolution that the
rounding offsets and per-group ranges SignRound learns cannot express. Each layer aims at the unchanged
model's hidden states (`--signround-target model`) at every width: with the scales that target is the better one
off the calibration's domain too, which plain SignRound's `model` is not at 4 bits (numbers below)."""

from __future__ import annotations

from typing import Literal

from compress.quant.methods.awq import AWQ, AWQOptions
from compress.quant.methods.signround import SignRound, SignRoundOptions


class AWQSignRoundOptions(SignRoundOptions, AWQOptions):
    pass


class AWQSignRound(SignRound):
    name = "awq+signround"
    Options = AWQSignRoundOptions

    gather = AWQ.gather
    prepare = AWQ.prepare

    @property
    def aim(self) -> Literal["layer", "model"]:
        # SmolLM2 w4a16 g64 with zero points, 16 samples, 50 float32 steps of 4 (benchmarks/RESULTS.md, "AWQ's scales
        # before tuned rounding"): `model` +3.5% / KL 0.055 on held-out pages, +11.5% / 0.199 on license texts; `layer`
        # +5.5% / 0.072 and +15.3% / 0.220
        return self.options.signround_target or "model"

    @classmethod
    def time_multiple(cls, stage) -> float:
        return super().time_multiple(stage) + AWQ.time_factor
