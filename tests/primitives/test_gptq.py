import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize

from compress.primitives.gptq import gptq
from compress.primitives.hessian import Hessian
from compress.primitives.qparams import NF4, NF4_ZERO, Grid, dequantize, quantize, search_range


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    out_f, in_f = 96, 256
    W = torch.randn(out_f, in_f) * 0.02
    mix = torch.randn(in_f, in_f) * 0.1 + torch.eye(in_f)
    X = (torch.randn(2048, in_f) @ mix) * torch.linspace(0.1, 3, in_f)  # correlated, uneven channels
    h = Hessian(in_f)
    for chunk in X.split(512):
        h.add(chunk)
    return W, X, h.H


def out_err(X, W, W_hat):
    return float((X @ (W - W_hat).T).pow(2).mean() / (X @ W.T).pow(2).mean())


def test_hessian_matches_definition(problem):
    _, X, H = problem
    assert torch.allclose(H, 2 * X.T @ X / len(X), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "grid",
    [Grid(4, "int", True, 64), Grid(4, "int", True, None), Grid(8, "float", True, None), Grid(4, "nf4", True, 64)],
    ids=str,
)
@pytest.mark.parametrize("actorder", [False, True])
def test_gptq_beats_rtn_on_output_error(problem, grid, actorder):
    W, X, H = problem
    s, z = search_range(W, grid, torch.float32)
    rtn = dequantize(quantize(W, s, z, grid), s, z)
    q, scale, zp = gptq(W, H, grid, torch.float32, actorder=actorder)
    assert out_err(X, W, dequantize(q, scale, zp)) < 0.85 * out_err(X, W, rtn)


@pytest.mark.parametrize("actorder", [False, True])
def test_gptq_integers_round_trip_through_the_format(problem, actorder):
    """Groups stay consecutive columns of the original order (no g_idx), also with actorder."""
    W, _, H = problem
    grid = Grid(4, "int", True, 32)
    q, scale, zp = gptq(W, H, grid, torch.bfloat16, actorder=actorder)
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7 and scale.shape == (96, 8)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    assert torch.equal(ct_quantize(dequantize(q, scale, zp).float(), scale, zp, args, dtype=torch.int8), q)


def test_gptq_nf4_codes_are_what_bitsandbytes_rebuilds(problem):
    """NF4: uint8 codes 0..15, float32 absmax per block; each weight NF4[code] * absmax, as bitsandbytes
    de-quantizes; pruned weights keep code 7 (exactly 0)."""
    W, _, H = problem
    W = W * (torch.rand_like(W) > 0.3)
    q, scale, _ = gptq(W, H, Grid(4, "nf4", True, 64), torch.float32, keep=W != 0)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.dtype == torch.float32 and scale.shape == (96, 4)
    assert bool((q[W == 0] == NF4_ZERO).all())
    w_hat = dequantize(q, scale, torch.zeros(()))
    by_hand = NF4[q.long()] * scale.repeat_interleave(64, dim=1)
    assert torch.equal(w_hat, by_hand) and bool((w_hat[W == 0] == 0).all())


def test_dead_inputs_do_not_break_it(problem):
    W, _, H = problem
    H = H.clone()
    H[:, 3] = 0
    H[3, :] = 0
    q, scale, zp = gptq(W, H, Grid(4, "int", True, 64), torch.float32)
    assert torch.isfinite(dequantize(q, scale, zp)).all() and int(q[:, 3].abs().sum()) == 0


@pytest.mark.parametrize("width", [100, 576, 1100])  # 1, 2 and 3 column blocks
def test_blocked_hessian_is_the_full_symmetric_product(width):
    x = torch.randn(300, width)
    h = Hessian(width)
    h.add(x)
    h.add(x[:50])
    assert torch.allclose(h.H, 2 * (x.T @ x + x[:50].T @ x[:50]) / 350, rtol=1e-5, atol=1e-5)
    assert torch.equal(h.sum, h.sum.T)


def test_bf16_inputs_give_the_float32_hessian():
    x = (torch.randn(2048, 576) * torch.rand(576) * 4).bfloat16()  # exactly what a bf16 layer feeds
    h16, h32 = Hessian(576), Hessian(576)
    h16.add(x)
    h32.add(x.float())
    assert torch.equal(h16.H, h32.H)  # no bfloat16 rounding of the products


@pytest.mark.parametrize(
    "grid", [Grid(4, "int", True, 64), Grid(8, "int", True, None), Grid(8, "float", True, None)], ids=str
)
def test_stacked_rows_quantize_as_if_alone(problem, grid):
    """q/k/v (or gate/up) share a Hessian and are quantized as one stacked weight: rows are
    independent, so each part must come out exactly as when quantized alone."""
    W, _, H = problem
    top, bottom = W[:40], W[40:]
    q, s, z = gptq(W, H, grid, torch.float32)
    for rows, part in ((slice(0, 40), top), (slice(40, None), bottom)):
        q1, s1, z1 = gptq(part, H, grid, torch.float32)
        assert torch.equal(q[rows].float(), q1.float()) and torch.equal(s[rows], s1) and torch.equal(z[rows], z1)


@pytest.mark.parametrize("grid", [Grid(4, "int", True, 64), Grid(3, "int", False, 32)], ids=str)
def test_gptaq_aims_at_the_unchanged_models_outputs(problem, grid):
    """Inputs that drifted from the float model's (x = x_float + noise, as after quantized layers): GPTQ on x
    matches W x; with the drift term it gets closer to W x_float, the output the model needs."""
    W, X, _ = problem
    g = torch.Generator().manual_seed(1)
    Xq = X + 0.3 * X.std() * torch.randn(X.shape, generator=g) @ (torch.randn(256, 256, generator=g) * 0.1)
    hq = Hessian(256)
    hq.add(Xq)
    drift = 2 * (X - Xq).T @ Xq / len(X)
    target = X @ W.T

    def err(q, scale, zp):
        return float((Xq @ dequantize(q, scale, zp).T - target).pow(2).mean() / target.pow(2).mean())

    plain = err(*gptq(W, hq.H, grid, torch.float32))
    aware = err(*gptq(W, hq.H, grid, torch.float32, drift=drift, drift_weight=1.0))
    assert aware < 0.9 * plain, (aware, plain)
    q, _, _ = gptq(W, hq.H, grid, torch.float32, drift=torch.zeros(256, 256))
    assert torch.equal(q, gptq(W, hq.H, grid, torch.float32)[0])  # no drift: GPTQ exactly
