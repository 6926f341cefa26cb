import pytest
import torch

from compress.primitives.gptq import gptq
from compress.primitives.masks import keep_n_of_m, keep_top, n_of_m_holds
from compress.primitives.qparams import Grid, dequantize
from compress.primitives.sparsegpt import sparsegpt


def _problem(seed=0, out_f=96, in_f=128, n=2048):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, in_f // 4, generator=g)
    x = z @ torch.randn(in_f // 4, in_f, generator=g) + 0.1 * torch.randn(n, in_f, generator=g)  # correlated inputs
    w = torch.randn(out_f, in_f, generator=g)
    return x, w, 2 * x.T @ x / n


def _err(x, w, wp):
    return float((x @ (w - wp).T).pow(2).sum() / (x @ w.T).pow(2).sum())


def test_sparsegpt_beats_magnitude_and_wanda_at_the_same_sparsity():
    x, w, h = _problem()
    pruned, mask = sparsegpt(w, h, 0.5)
    assert float((pruned == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    assert torch.equal(pruned == 0, ~mask)
    magnitude = w * keep_top(w.abs(), 0.5, per_row=False)
    wanda = w * keep_top(w.abs() * x.norm(dim=0), 0.5, per_row=True)
    assert _err(x, w, pruned) < 0.7 * min(_err(x, w, magnitude), _err(x, w, wanda))


def test_sparsegpt_n_of_m():
    x, w, h = _problem(1)
    pruned, _ = sparsegpt(w, h, 0.5, nm=(2, 4))
    assert n_of_m_holds(pruned, 2, 4) and float((pruned == 0).float().mean()) == 0.5
    assert _err(x, w, pruned) < _err(x, w, w * keep_n_of_m(w.abs() * x.norm(dim=0), 2, 4))


def test_stacked_rows_prune_as_if_alone():
    _, w, h = _problem(2)
    together, _ = sparsegpt(w, h, 0.5, rows=[32, 64])
    assert torch.equal(together, torch.cat([sparsegpt(w[:32], h, 0.5)[0], sparsegpt(w[32:], h, 0.5)[0]]))


@pytest.mark.parametrize(
    "grid",
    [Grid(4, "int", True, 32), Grid(4, "int", False, 32), Grid(8, "float", True, None)],
    ids=["sym", "asym", "fp8"],
)
def test_gptq_keeps_pruned_weights_zero(grid):
    _, w, h = _problem(3)
    keep = keep_n_of_m(w.abs(), 2, 4)
    q, scale, zp = gptq(w * keep, h, grid, torch.float32, keep=keep)
    deq = dequantize(q, scale, zp)
    assert (deq[~keep] == 0).all() and n_of_m_holds(deq, 2, 4)
