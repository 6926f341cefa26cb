import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize

from compress.primitives.qparams import (
    ACTIVATIONS,
    NF4,
    Grid,
    compute_qparams,
    dequantize,
    fake_quantize_tokens,
    quantize,
    search_range,
    sqnr_db,
)

GRIDS = {
    "int4-g64-sym": Grid(4, "int", True, 64),
    "int8-channel-sym": Grid(8, "int", True, None),
    "int8-channel-asym": Grid(8, "int", False, None),
    "fp8-channel": Grid(8, "float", True, None),
}


def ct_args(g: Grid) -> QuantizationArgs:
    return QuantizationArgs(
        num_bits=g.bits,
        type=g.kind,
        symmetric=g.symmetric,
        strategy="group" if g.group_size else "channel",
        group_size=g.group_size,
    )


@pytest.fixture
def weight() -> torch.Tensor:
    torch.manual_seed(0)
    return (torch.randn(96, 256) * 0.02).to(torch.bfloat16)


@pytest.mark.parametrize("name", GRIDS)
def test_integers_match_compressed_tensors(weight, name):
    """Our grid is compressed-tensors' grid: the loader rebuilds exactly our values."""
    grid = GRIDS[name]
    scale, zp = compute_qparams(weight, grid, torch.bfloat16)
    ours = quantize(weight, scale, zp, grid)
    exact = dequantize(ours, scale, zp).float()  # on-grid fp32 weights, as the writer passes them
    theirs = ct_quantize(exact, scale, zp, ct_args(grid), dtype=ours.dtype)
    assert torch.equal(ours.view(torch.int8), theirs.view(torch.int8))


@pytest.mark.parametrize(
    "name,min_db",
    [("int4-g64-sym", 17.0), ("int8-channel-sym", 36.0), ("int8-channel-asym", 36.0), ("fp8-channel", 28.0)],
)
def test_sqnr(weight, name, min_db):
    grid = GRIDS[name]
    scale, zp = compute_qparams(weight, grid, torch.float32)
    approx = dequantize(quantize(weight, scale, zp, grid), scale, zp)
    assert sqnr_db(weight, approx) > min_db


def test_int_rounding_error_is_at_most_half_a_step(weight):
    grid = GRIDS["int4-g64-sym"]
    scale, zp = compute_qparams(weight.float(), grid, torch.float32)
    approx = dequantize(quantize(weight, scale, zp, grid), scale, zp)
    step = scale.abs().repeat_interleave(64, 1)
    # the extreme is exactly on -8; only the other end may clip, by at most one step (it reaches 7 steps of 8)
    assert ((weight.float() - approx).abs() <= step * 0.5 + 1e-6).float().mean() > 0.99
    assert ((weight.float() - approx).abs() <= step * 1.0 + 1e-6).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_extreme_lands_on_the_lowest_integer_whatever_its_sign(bits):
    grid = Grid(bits, "int", True, 4)
    w = torch.tensor([[0.5, -0.1, 0.2, 1.0], [-1.0, 0.3, 0.9, 0.0]])  # extremes +1.0 and -1.0
    scale, zp = compute_qparams(w, grid, torch.float32)
    q = quantize(w, scale, zp, grid)
    assert scale[0, 0] < 0 < scale[1, 0] and bool((zp == 0).all())
    assert q[0, 3] == q[1, 0] == grid.qmin  # the step is absmax / 2^(bits-1), not absmax / (2^(bits-1) - 0.5)
    assert torch.allclose(scale.abs(), torch.full_like(scale, 2.0 ** (1 - bits)))
    assert torch.equal(dequantize(q, scale, zp)[:, [3, 0]].diagonal(), torch.tensor([1.0, -1.0]))


def test_range_and_zero_point(weight):
    grid = GRIDS["int8-channel-asym"]
    scale, zp = compute_qparams(weight, grid, torch.float32)
    q = quantize(weight, scale, zp, grid)
    assert q.dtype == torch.int8 and zp.dtype == torch.int8
    assert int(q.min()) >= -128 and int(q.max()) <= 127
    q4 = quantize(weight, *compute_qparams(weight, GRIDS["int4-g64-sym"], torch.float32), GRIDS["int4-g64-sym"])
    assert int(q4.min()) >= -8 and int(q4.max()) <= 7


def test_zero_weights_do_not_divide_by_zero():
    w = torch.zeros(4, 64)
    scale, zp = compute_qparams(w, GRIDS["int4-g64-sym"], torch.bfloat16)
    assert (scale > 0).all()
    assert torch.equal(dequantize(quantize(w, scale, zp, GRIDS["int4-g64-sym"]), scale, zp).float(), w)


@pytest.mark.parametrize("name", GRIDS)
def test_range_search_never_increases_weight_error(weight, name):
    from compress.primitives.qparams import search_range

    grid = GRIDS[name]
    plain = compute_qparams(weight, grid, torch.bfloat16)
    searched = search_range(weight, grid, torch.bfloat16)
    err = lambda s, z: (weight.float() - dequantize(quantize(weight, s, z, grid), s, z).float()).pow(2).sum()  # noqa: E731
    assert err(*searched) <= err(*plain)
    # and the searched integers still round-trip through compressed-tensors
    q = quantize(weight, *searched, grid)
    theirs = ct_quantize(dequantize(q, *searched).float(), *searched, ct_args(grid), dtype=q.dtype)
    assert torch.equal(q.view(torch.int8), theirs.view(torch.int8))


@pytest.mark.parametrize("name", GRIDS)
def test_range_search_picks_the_best_ratio_per_group(weight, name):
    """The all-ratios-at-once search equals trying each ratio with compute_qparams, in chunks
    of rows small enough to force several."""
    import compress.primitives.qparams as qp

    grid = GRIDS[name]
    importance = torch.rand(weight.shape[1])
    ratios = qp.default_ratios(grid)
    best_err = best_s = best_z = None
    for r in ratios.tolist():  # reference: one ratio at a time, the first best kept on ties
        s, z = compute_qparams(weight, grid, torch.bfloat16, clip=r)
        sq = (weight.float() - dequantize(quantize(weight, s, z, grid), s, z).float()).pow(2) * importance
        err = qp.grouped(sq, weight.shape[1] // s.shape[1]).sum(-1)  # [O, G]
        if best_err is None:
            best_err, best_s, best_z = err, s, z
        better = err < best_err
        best_err, best_s, best_z = (
            torch.where(better, err, best_err),
            torch.where(better, s, best_s),
            torch.where(better, z, best_z),
        )
    old = qp.SEARCH_ELEMENTS
    qp.SEARCH_ELEMENTS = len(ratios) * weight.shape[1] * 3  # three rows per chunk
    try:
        s, z = qp.search_range(weight, grid, torch.bfloat16, importance=importance)
    finally:
        qp.SEARCH_ELEMENTS = old
    assert torch.equal(s, best_s) and torch.equal(z, best_z)


def test_nf4_rounds_to_the_nearest_code_and_searched_ranges_fit_better(weight):
    """Each weight goes to the NF4 value nearest w / absmax (brute force agrees); searching each block's range
    (clipping its absmax) lowers the squared error; codes 0 and 15 are -1 and +1, so min/max is exact at the ends."""
    grid = Grid(4, "nf4", True, 64)
    scale, zp = compute_qparams(weight, grid, torch.float32)
    q = quantize(weight, scale, zp, grid)
    x = weight.float().reshape(96, 4, 64) / scale[..., None]
    brute = (x[..., None] - NF4).abs().argmin(-1).reshape(96, 256)
    assert q.dtype == torch.uint8 and torch.equal(q.long(), brute)
    absmax = weight.float().abs().reshape(96, 4, 64).amax(-1)
    assert torch.equal(scale, absmax)
    s2, z2 = search_range(weight, grid, torch.float32)
    err = [
        (dequantize(quantize(weight, s, z, grid), s, z) - weight.float()).pow(2).sum()
        for s, z in ((scale, zp), (s2, z2))
    ]
    assert err[1] < err[0]


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_token_rounding_is_compressed_tensors_forward(act):
    """What the calibration and the exports simulate is, value for value, what a reloaded checkpoint runs: an
    identity linear under compressed-tensors' dynamic per-token activations returns its rounded input."""
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
    )

    from compress.formats.compressed_tensors import ct_scheme

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False))
    lin[0].weight.data = torch.eye(64)
    scheme = ct_scheme(Grid(8, "int", True, None), act, ["Linear"])
    scheme.weights = None
    cfg = QuantizationConfig(config_groups={"g": scheme}, quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(lin, cfg)
    x = torch.randn(3, 7, 64) * torch.linspace(0.1, 5, 64) + 0.7  # [B, T, K]; uneven channels, off-centre
    with torch.no_grad():
        want = lin(x)
    got = fake_quantize_tokens(x.reshape(-1, 64), act).reshape(x.shape)
    assert torch.equal(got, want)
    assert not torch.equal(got, x)
