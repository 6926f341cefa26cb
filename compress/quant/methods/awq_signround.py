"""AWQ's scales, then SignRound's tuned rounding: each norm's per-channel scale is folded into the
linears it feeds first (AWQ's search, `awq.py`), and SignRound (`signround.py`) then learns the
rounding of the scaled weights. The scales give the grid a per-input-channel resolution that the
rounding offsets and per-group ranges SignRound learns cannot express."""

from __future__ import annotations

from compress.calibrate import Gather
from compress.quant.methods.awq import AWQ, AWQOptions
from compress.quant.methods.signround import SignRound, SignRoundOptions


class AWQSignRoundOptions(SignRoundOptions, AWQOptions):
    pass


class AWQSignRound(SignRound):
    name = "awq+signround"
    Options = AWQSignRoundOptions

    def gather(self, model, layer, targets) -> Gather:
        return AWQ.gather(self, model, layer, targets)

    prepare = AWQ.prepare

    @classmethod
    def time_multiple(cls, stage) -> float:
        return SignRound.time_multiple.__func__(cls, stage) + AWQ.time_factor
