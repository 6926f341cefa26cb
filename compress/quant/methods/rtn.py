"""Round to nearest: each weight goes to the nearest point of its group's grid; no data."""

from __future__ import annotations

import torch

from compress.calibrate import InputStats
from compress.quant.method import Quantized, QuantMethod, round_weights


class RTN(QuantMethod):
    name = "rtn"
    calibrated = False
    working_memory = 0.25

    def quantize(self, w: torch.Tensor, stats: InputStats | None) -> Quantized:
        return round_weights(w, self.target)
