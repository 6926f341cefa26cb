"""MatMulNBits packing: exact round trips, and ONNX Runtime's kernel against the
de-quantized matmul on random shapes."""

import numpy as np
import pytest

from compress.export.onnx_graph import (
    FLOAT,
    INT64,
    Graph,
    dequantize_nbits,
    gather_nbits,
    half_if_exact,
    matmul_nbits,
    nbits_block,
    pack_nbits,
    rtn_nbits,
    with_refined_rows,
)


def unpack(packed: np.ndarray, bits: int, n: int, k: int) -> np.ndarray:
    if bits == 4:
        lo, hi = packed & 0xF, packed >> 4
        packed = np.stack([lo, hi], -1).reshape(n, -1)
    return packed.reshape(n, k).astype(np.int16) - (1 << (bits - 1))


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_round_trip(bits):
    rng = np.random.default_rng(0)
    q = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=(24, 192)).astype(np.int8)
    scale = rng.random((24, 3)).astype(np.float32)  # groups of 64
    nb = pack_nbits(q, scale, None, bits, 32)
    assert nb.packed.shape == (24, 6, 32 * bits // 8)
    assert np.array_equal(unpack(nb.packed, bits, 24, 192), q)
    assert np.array_equal(nb.scales.reshape(24, 6), np.repeat(scale, 2, axis=1))  # one scale per block
    assert nb.zero_points is None


def test_blocks_divide_groups():
    assert nbits_block(576, 64) == 64
    assert nbits_block(576, None) == 64  # per channel: the largest power of two dividing K
    assert nbits_block(1536, None) == 256
    assert nbits_block(576, 48) == 16
    assert nbits_block(100, None) is None


def run_nbits(x: np.ndarray, nb, accuracy_level: int = 0) -> np.ndarray:
    import onnxruntime as ort

    g = Graph()
    a = g.input("a", FLOAT, ["m", nb.k])
    g.output(matmul_nbits(g, a, "w", nb, accuracy_level), "y", FLOAT, ["m", nb.n])
    sess = ort.InferenceSession(g.model("t").SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"a": x})[0]


@pytest.mark.parametrize(
    "bits,block,asym", [(4, 32, False), (4, 64, False), (8, 64, False), (8, 128, True), (4, 16, True)]
)
@pytest.mark.parametrize("shape", [(48, 256), (96, 512)])
def test_kernel_matches_dequantized_matmul(bits, block, asym, shape):
    rng = np.random.default_rng(bits + block)
    n, k = shape
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    q = rng.integers(lo, hi, size=(n, k)).astype(np.int8)
    scale = (rng.random((n, k // block)) * 0.02 + 0.001).astype(np.float32)
    zp = (
        rng.integers(lo // 2, hi // 2, size=(n, k // block)).astype(np.int8)
        if asym
        else np.zeros((n, k // block), np.int8)
    )
    w = (q.reshape(n, -1, block) - zp[..., None].astype(np.float32)) * scale[..., None]
    x = rng.standard_normal((5, k)).astype(np.float32)
    got = run_nbits(x, pack_nbits(q, scale, zp, bits, block))
    want = x @ w.reshape(n, k).T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_rtn_output_layer_close():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    want = x @ w.T
    for bits, tol in ((8, 0.01), (4, 0.2)):
        got = run_nbits(x, rtn_nbits(w, bits, 32))
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < tol


def test_scales_halved_only_when_exact():
    exact = np.array([[0.0123, -0.5], [3.0, 1e-3]], dtype=np.float16).astype(np.float32)
    assert half_if_exact(exact).dtype == np.float16
    assert np.array_equal(half_if_exact(exact).astype(np.float32), exact)
    inexact = exact + np.float32(1e-7)  # between float16 values: kept float32, unchanged
    assert half_if_exact(inexact).dtype == np.float32 and np.array_equal(half_if_exact(inexact), inexact)
    assert half_if_exact(np.array([1e-9], np.float32)).dtype == np.float32  # below float16's range


@pytest.mark.parametrize("symmetric, block", [(True, 32), (False, 16)])
def test_refined_rows_in_lookup_and_matmul(symmetric, block):
    """A 4-bit table (with zero points or without) whose some rows carry their rounding error rounded again:
    GatherBlockQuantized and MatMulNBits read the same codes, float16 scales and zero points, add the correction to
    those rows only, and both equal the de-quantized table (refined rows included)."""
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    w = rng.standard_normal((40, 64)).astype(np.float32)
    rows = np.array([0, 7, 8, 39])
    plain = rtn_nbits(w, 4, block, symmetric)
    assert plain.scales.dtype == np.float16 and (plain.zero_points is None) == symmetric
    table = with_refined_rows(plain, w, rows)
    full = dequantize_nbits(table)
    err, before = np.abs(full - w).max(1), np.abs(dequantize_nbits(plain) - w).max(1)
    assert np.all(err[rows] < 0.2 * before[rows])  # a second 4-bit pass: an order closer
    assert np.array_equal(np.delete(full, rows, 0), np.delete(dequantize_nbits(plain), rows, 0))  # others untouched
    g = Graph()
    ids, x = g.input("ids", INT64, [1, "s"]), g.input("x", FLOAT, ["m", 64])
    g.output(gather_nbits(g, ids, "t", table), "rows", FLOAT, [1, "s", 64])
    g.output(matmul_nbits(g, x, "t", table, 0), "y", FLOAT, ["m", 40])
    sess = ort.InferenceSession(g.model("t").SerializeToString(), providers=["CPUExecutionProvider"])
    tokens = np.array([[7, 1, 39, 0, 8, 20, 7]])
    xs = rng.standard_normal((3, 64)).astype(np.float32)
    got_rows, got_y = sess.run(["rows", "y"], {"ids": tokens, "x": xs})
    np.testing.assert_allclose(got_rows[0], full[tokens[0]], rtol=0, atol=1e-6)  # base + correction, one rounding
    np.testing.assert_allclose(got_y, xs @ full.T, rtol=1e-4, atol=1e-4)
