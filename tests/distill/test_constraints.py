"""A pruned student keeps its zeros; a quantized one trains through its grid."""

import torch

from compress.distill.constraints import FakeQuant, SparsityMasks
from compress.primitives.qparams import Grid, GridParams, compute_qparams, dequantize, quantize


def test_masks_hold_zeros_through_adamw_steps():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.1] = 0
    zeros = lin.weight == 0
    masks = SparsityMasks({"lin": lin})
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        lin(torch.randn(4, 16)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        masks.apply()
    assert int(zeros.sum()) > 0 and masks.zeros() == int(zeros.sum())
    assert bool((lin.weight[zeros] == 0).all()) and bool((lin.weight[~zeros] != 0).all())


def _quantized_linear(group: int = 8):
    torch.manual_seed(0)
    grid = Grid(4, "int", True, group)
    w = torch.randn(8, 16)
    scale, zp = compute_qparams(w, grid, torch.bfloat16)
    q = quantize(w, scale, zp, grid)
    lin = torch.nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(dequantize(q, scale.float(), zp))
    return lin, GridParams(grid, scale, zp), q


def test_fake_quant_starts_exact_passes_gradients_and_saves_on_the_grid():
    lin, params, q0 = _quantized_linear()
    start = lin.weight.detach().clone()
    fake = FakeQuant({"lin": lin}, {"lin": params})
    assert torch.equal(lin.weight, start)  # rounding the checkpoint's weights changes nothing
    x = torch.randn(4, 16)
    lin(x).sum().backward()
    grad = fake.latent("lin").grad
    assert grad is not None and torch.allclose(grad, x.sum(0).expand(8, 16))  # straight through
    with torch.no_grad():
        fake.latent("lin").add_(0.6 * params.scale.float().repeat_interleave(8, dim=1))  # push weights past a grid step
    q, p = fake.remove()["lin"]
    assert p is params and q.dtype == torch.int8 and not torch.equal(q, q0)
    assert torch.equal(
        lin.weight.detach(), dequantize(q, params.scale.float(), params.zero_point)
    )  # left rounded, on the grid
