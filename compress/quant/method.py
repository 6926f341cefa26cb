"""The interface a quantization method implements, and the rounding every non-GPTQ method ends with."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch

from compress.calibrate import Gather, InputStats, Layer, LayerInputs
from compress.method import Method
from compress.models.arch import Smooth, smooth_maps
from compress.primitives.qparams import Grid, compute_qparams, quantize, search_range
from compress.primitives.smoothing import fold

Quantized = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # integers [O, I], scale [O, G], zero point [O, G]


@dataclass(frozen=True)
class Target:
    """What the stage asks of every method: the weight grid, how activations are quantized
    (None, "int8", "fp8"), whether zeros must stay zeros (a pruned model), whether each
    group's range is searched for least error (else min/max), and the dtype results are stored in."""

    grid: Grid
    act: str | None = None
    keep_zeros: bool = False
    range_search: bool = True
    dtype: torch.dtype | None = None  # the checkpoint's: scales are computed in it (None: the weight's)
    device: str = "cpu"  # where the layers compute (a method may pick its compute dtype by it)
    # Mixed precision (quant/mixed.py): a grid per linear, by id() of the module; `grid` for the others.
    grids: Mapping[int, Grid] = field(default_factory=dict)

    def grid_of(self, lins: list[torch.nn.Linear]) -> Grid:
        """The grid of these linears; where they differ (a smoothing pair over linears of several widths), the
        fewest bits, whose error the shared scale matters most to."""
        return min((self.grids.get(id(lin), self.grid) for lin in lins), key=lambda g: g.bits)

    def scale_dtype(self, w: torch.Tensor) -> torch.dtype:
        """Scales in the stored dtype even when the model computes in float32 (`models.compute`); NF4's absmax is
        float32 in bitsandbytes' format."""
        if self.grid.kind == "nf4":
            return torch.float32
        return self.dtype or w.dtype


class QuantMethod(Method):
    def __init__(self, options, target: Target):
        super().__init__(options)
        self.target = target

    def on_grid(self, grid: Grid) -> QuantMethod:
        """This method quantizing onto `grid` (a mixed-precision width); it shares the gathered state."""
        if grid == self.target.grid:
            return self
        other = copy.copy(self)
        other.target = replace(self.target, grid=grid)
        return other

    def gather(self, model: torch.nn.Module, layer: torch.nn.Module, targets: dict[str, torch.nn.Linear]) -> Gather:
        """The input statistics `prepare` and `quantize` read (calibrated methods)."""
        return Gather()

    def prepare(self, model: torch.nn.Module, layer: Layer) -> None:
        """Change the decoder layer as a whole before its linears are quantized (smoothing)."""

    def quantize_layer(self, model: torch.nn.Module, layer: Layer, inputs: LayerInputs) -> dict[str, Quantized] | None:
        """All of a decoder layer's linears at once, against the layer's outputs on `inputs` (the
        calibration batches as the layers before produced them): a result per name in
        `layer.targets`, or None to quantize each group of linears by `quantize`."""
        return None

    def quantize(self, w: torch.Tensor, stats: InputStats | None) -> Quantized:
        """w [O, I] in the layer's dtype: the rows of every linear that reads one input, stacked
        (rows are independent). stats: None for a method that reads no data."""
        raise NotImplementedError


@torch.no_grad()
def round_weights(w: torch.Tensor, target: Target, importance: torch.Tensor | None = None) -> Quantized:
    """Round to nearest on each group's range: min/max, or searched for the least squared error,
    weighted per input column by `importance` (E[x^2]) when given."""
    dtype, w = target.scale_dtype(w), w.float()
    grid = target.grid
    scale, zp = (
        search_range(w, grid, dtype, importance=importance) if target.range_search else compute_qparams(w, grid, dtype)
    )
    return quantize(w, scale, zp, grid), scale, zp


def smooth(
    model: torch.nn.Module,
    layer: Layer,
    scale_for: Callable[[Smooth, list[torch.nn.Linear]], torch.Tensor],
    dtype: torch.dtype | None = None,
) -> None:
    """Fold a per-channel scale into the op before each smoothable group of linears (the
    architecture's norm -> projections maps), the weights rounded to `dtype` (the stored one),
    and rescale their statistics to match."""
    device = next(layer.module.parameters()).device
    for m in smooth_maps(model, layer.module):
        if not all(n in layer.targets for n in m.linears):
            continue  # a linear the user kept dense: leave this pair alone
        lins = [layer.targets[n] for n in m.linears]
        s = scale_for(m, lins)
        fold(layer.module.get_submodule(m.prev), lins, s.to(device), dtype, m.prev_scale(s).to(device), m.offset)
        for st in {id(layer.stats[n]): layer.stats[n] for n in m.linears}.values():
            st.rescale(s)
