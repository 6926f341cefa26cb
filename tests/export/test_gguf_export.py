"""GGUF export: exact block types carry our integers over (read back identical), the rest is
re-quantized with a note, and llama.cpp (when installed) runs the file."""

from pathlib import Path

import numpy as np
import pytest
import torch

from compress.errors import UsageError
from compress.export import gguf_export
from compress.formats.stored import read
from compress.models.load import load
from compress.models.source import resolve
from compress.runtime import llama_cpp
from tests.conftest import tiny_llama_like


def llama_cpp_gap(model, gguf_file) -> float:
    """Largest difference of next-token log-probabilities between llama.cpp on the file and PyTorch on `model`."""
    ids = [5, 17, 99, 3, 250, 11, 7, 8, 40, 41, 42, 1000, 2000, 3]
    dec = llama_cpp.LlamaCppDecoder(gguf_file, threads=1, n_ctx=64, logits_all=True)
    try:
        got = dec.logprobs(ids)
    finally:
        dec.close()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    want = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    return float(np.abs(got - want).max())


def export(ckpt, dest, **options):
    loaded = load(resolve(str(ckpt)), dtype="float32", quantized=True)
    dest.mkdir()
    return loaded, gguf_export.export(loaded, dest, **options)


# Each case once (gguf's reader takes ~7 s a file, parsing the 49k-token vocabulary): both families,
# both block types, a group of one block and of two.
@pytest.mark.parametrize(
    "arch,scheme,group,kind",
    [("llama", "w8a16", "channel", "Q8_0"), ("llama", "w4a16", 64, "Q4_0"), ("qwen2", "w4a16", 32, "Q4_0")]
    + [("qwen3", "w4a16", 32, "Q4_0")],  # its per-head query and key norms, head_dim apart from hidden / heads
)
def test_exact_types_read_back_identical(quantized, tmp_path, arch, scheme, group, kind):
    ckpt = quantized(arch, scheme, group)
    _, out = export(ckpt, tmp_path / "gguf")
    linears = len(read(ckpt))
    # + token embedding and the untied output layer, Q8_0 by default for a checkpoint with integer weights
    assert out.exact == linears and out.requantized == 0 and out.types[kind] == linears + 2 * (kind == "Q8_0")
    assert out.embed_bits == out.lm_head_bits == 8
    assert out.check.verdict == "every exact tensor identical" and out.check.max_abs_diff_exact == 0.0
    assert out.check.tensors_compared == linears + 2 and out.check.table_rel_error < 0.01
    assert out.file_bytes == (tmp_path / "gguf" / "model.gguf").stat().st_size
    # embedding, final norm, output layer; per layer (2): 7 linears and 2 norms, qwen2's q/k/v biases, qwen3's q/k norms
    assert out.tensors == 3 + 2 * (9 + {"qwen2": 3, "qwen3": 2}.get(arch, 0))


def test_int3_is_exact_q4_0(quantized, tmp_path):
    """int3 values are int4 values on the same scale (int2 takes the same path: bits <= 4)."""
    ckpt = quantized("llama", "w3a16", 32)
    _, out = export(ckpt, tmp_path / "gguf")
    assert out.exact == out.types["Q4_0"] == len(read(ckpt)) and out.requantized == 0
    assert out.check.verdict == "every exact tensor identical"


def test_q4_0_layout_matches_gguf_reference():
    """Our block writer against gguf's own Q4_0/Q8_0 de-quantizer on random integers."""
    import gguf

    rng = np.random.default_rng(0)
    for bits, qtype in ((4, gguf.GGMLQuantizationType.Q4_0), (8, gguf.GGMLQuantizationType.Q8_0)):
        q = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=(8, 96)).astype(np.int8)
        scale = (rng.random((8, 3)) - 0.5).astype(np.float16).astype(np.float32)  # signed, as symmetric grids are
        blocks, rounded = gguf_export.q_blocks(q, scale, bits)
        want = (q.reshape(8, 3, 32) * scale[..., None]).reshape(8, 96)
        assert rounded == 0
        assert np.array_equal(gguf.quants.dequantize(blocks, qtype).reshape(8, 96), want)


def test_q4_1_layout_matches_gguf_reference():
    """Zero points: our Q4_1 blocks against gguf's de-quantizer, exact where float16 holds d and m."""
    import gguf

    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, size=(8, 96)).astype(np.int8)
    zp = rng.integers(-8, 8, size=(8, 3)).astype(np.int8)
    scale = (rng.integers(1, 64, size=(8, 3)) / 1024).astype(np.float32)  # few bits: d and m exact in float16
    blocks, rounded = gguf_export.q_blocks(q, scale, 4, zp)
    want = ((q.reshape(8, 3, 32) - zp[..., None]) * scale[..., None]).reshape(8, 96)
    assert rounded == 0 and blocks.shape == (8, 3 * 20)
    assert np.array_equal(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1).reshape(8, 96), want)


def test_asymmetric_int4_is_q4_1(quantized, tmp_path):
    ckpt = quantized("llama", "w4a16", 32, symmetric=False)
    _, out = export(ckpt, tmp_path / "gguf")
    assert out.exact == out.types["Q4_1"] == len(read(ckpt)) and out.requantized == 0 and out.kquant == 0
    # every tensor whose minimums float16 holds is identical; the rest are within float16's rounding of m
    assert out.check.max_abs_diff_exact == 0.0
    assert out.check.requantized_rel_error is None or out.check.requantized_rel_error < 1e-3


def test_fp8_is_requantized_with_its_cost(quantized, tmp_path):
    _, out = export(quantized("llama", "fp8"), tmp_path / "gguf")
    assert out.exact == 0 and out.requantized == len(read(quantized("llama", "fp8")))
    assert out.check.requantized_rel_error < 0.01
    assert any("re-quantized to Q8_0" in n for n in out.notes)


def test_q5_layouts_match_gguf_reference():
    """int5: our Q5_0 (symmetric) and Q5_1 (zero points) blocks against gguf's de-quantizer."""
    import gguf

    rng = np.random.default_rng(1)
    q = rng.integers(-16, 16, size=(8, 96)).astype(np.int8)
    zp = rng.integers(-16, 16, size=(8, 3)).astype(np.int8)
    scale = (rng.integers(1, 64, size=(8, 3)) / 1024).astype(np.float32)
    for zero_point, qtype, size in ((None, "Q5_0", 22), (zp, "Q5_1", 24)):
        blocks, rounded = gguf_export.q_blocks(q, scale, 5, zero_point)
        zpb = 0 if zero_point is None else zero_point[..., None]
        want = ((q.reshape(8, 3, 32) - zpb) * scale[..., None]).reshape(8, 96)
        assert rounded == 0 and blocks.shape == (8, 3 * size)
        got = gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, qtype)).reshape(8, 96)
        assert np.array_equal(got, want)


@pytest.mark.parametrize("bits", [4, 5])
def test_k_quant_blocks_keep_our_integers(bits):
    """Q4_K/Q5_K from our integers, scales and zero points: gguf's de-quantizer reads back exactly the error we
    report, and every sub-block is our integers on a rounded scale and minimum (the integers are not re-chosen)."""
    import gguf

    from compress.export import gguf_kquants

    rng = np.random.default_rng(bits)
    half = 1 << (bits - 1)
    q = rng.integers(-half, half, size=(6, 512)).astype(np.int8)
    zp = rng.integers(-half, half, size=(6, 16)).astype(np.int8)
    scale = (0.01 * np.exp(rng.normal(0, 0.3, size=(6, 16)))).astype(np.float32)  # as spread as real groups
    blocks, rel = gguf_kquants.blocks(q, scale, zp, bits)
    assert blocks.shape == (6, 2 * {4: 144, 5: 176}[bits])
    got = gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, gguf_kquants.KQUANT[bits]))
    want = (q.reshape(6, 16, 32) - zp[..., None]) * scale[..., None]
    got = got.reshape(6, 16, 32)
    assert np.isclose(np.linalg.norm(got - want) / np.linalg.norm(want), rel, rtol=1e-4) and rel < 0.02
    # (6-bit scales cost ~1% of the weights here, against ~8% for int4's own rounding: they add in quadrature)
    # got = alpha * (q + half) - beta per sub-block: a straight line through our integers
    u = q.reshape(6, 16, 32).astype(np.float64) + half
    for r, g in ((0, 0), (3, 7), (5, 15)):
        slope, icept = np.polyfit(u[r, g], got[r, g], 1)
        assert np.abs(slope * u[r, g] + icept - got[r, g]).max() < 1e-6
        assert abs(slope / scale[r, g] - 1) < 0.05  # the scale moved by its 6-bit rounding only


@pytest.mark.parametrize("bits", [3, 6])
def test_symmetric_k_quant_blocks_keep_our_integers(bits):
    """Q3_K/Q6_K from symmetric int3/int6 in groups of 16: gguf's de-quantizer reads back our integers times a
    rounded sub-block scale, with exactly the error we report."""
    import gguf

    from compress.export import gguf_kquants

    rng = np.random.default_rng(bits)
    half = 1 << (bits - 1)
    q = rng.integers(-half, half, size=(6, 512)).astype(np.int8)
    scale = (0.01 * np.exp(rng.normal(0, 0.3, size=(6, 32)))).astype(np.float32)
    scale *= rng.choice([-1, 1], size=scale.shape)  # symmetric scales carry the sign of their group's extreme
    blocks, rel = gguf_kquants.blocks_symmetric(q, scale, bits)
    assert blocks.shape == (6, 2 * {3: 110, 6: 210}[bits])
    got = gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, gguf_kquants.KQUANT_SYM[bits]))
    got, want = got.reshape(6, 32, 16), (q.reshape(6, 32, 16) * scale[..., None])
    assert np.isclose(np.linalg.norm(got - want) / np.linalg.norm(want), rel, rtol=1e-4) and rel < 0.02
    ratio = got / np.where(q == 0, 1, q).reshape(6, 32, 16)  # one scale per sub-block, our integers untouched
    nonzero = q.reshape(6, 32, 16) != 0
    first = np.take_along_axis(ratio, nonzero.argmax(-1)[..., None], -1)  # each sub-block's first nonzero's
    assert np.allclose(np.where(nonzero, ratio, first), first)
    assert np.array_equal(np.sign(first[..., 0]), np.sign(scale))
    assert np.all(np.where(q.reshape(6, 32, 16) == 0, got, 0) == 0)
    assert gguf_kquants.kind(512, 16, bits, True) == gguf_kquants.KQUANT_SYM[bits]
    assert gguf_kquants.kind(576, 16, bits, True) is None and gguf_kquants.kind(512, None, bits, True) is None


def test_k_quants_where_rows_allow(tiny_model, tmp_path):
    """A 256-wide model with zero points: every linear becomes Q4_K (its rows are whole super-blocks), read back
    within the reported error; --no-k-quants keeps them exactly Q4_1; a float checkpoint keeps float tables."""
    src = tiny_llama_like(tiny_model("llama"), tmp_path / "wide", hidden_size=256, intermediate_size=512, head_dim=64)
    _, plain = export(src, tmp_path / "plain")
    assert plain.embed_bits is None and plain.types.get("Q8_0", 0) == 0 and plain.kquant == 0

    from rich.console import Console

    from compress import api
    from compress.recipe import validate

    def quantize(name: str, **stage) -> Path:
        stage = {"stage": "quantize", "group_size": 32, "symmetric": False, "method": "rtn", **stage}
        out = tmp_path / name
        recipe = validate({"model": str(src), "output": str(out), "evaluate": {"enabled": False}, "stages": [stage]})
        api.run(recipe, Console(quiet=True))
        return out

    ckpt = quantize("q", scheme="w4a16")
    _, out = export(ckpt, tmp_path / "k")
    linears = len(read(ckpt))
    assert out.kquant == out.types["Q4_K"] == linears and out.exact == 0
    assert out.check.kquant_rel_error < 0.03 and out.check.verdict == "every exact tensor identical"
    assert any("as Q4_K" in n for n in out.notes)
    _, exact = export(ckpt, tmp_path / "exact", k_quants=False)
    assert exact.types["Q4_1"] == linears and exact.kquant == 0
    assert out.file_bytes < exact.file_bytes  # 4.5 bits a weight instead of 5
    _, floats = export(ckpt, tmp_path / "float-tables", embed_bits=0, lm_head_bits=0)
    assert floats.types.get("Q8_0", 0) == 0 and floats.embed_bits is None and floats.lm_head_bits is None
    runs = [(ckpt, tmp_path / "k")]
    for scheme, kind in (("w3a16", "Q3_K"), ("w6a16", "Q6_K")):  # symmetric, groups of 16
        sym = quantize(scheme, scheme=scheme, group_size=16, symmetric=True)
        _, out = export(sym, tmp_path / f"{scheme}-gguf")
        assert out.kquant == out.types[kind] == linears and out.check.kquant_rel_error < 0.03
        runs.append((sym, tmp_path / f"{scheme}-gguf"))
    for source, exported in runs if llama_cpp.available() else []:
        # llama.cpp's own k-quant kernels on the files: next-token log-probs near PyTorch's on the checkpoint
        loaded = load(resolve(str(source)), dtype="float32", quantized=True)
        # rounded sub-block scales and the Q8_0 tables: not exact
        assert llama_cpp_gap(loaded.model, exported / "model.gguf") < 0.1, exported


def test_encoder_refused(quantized, tmp_path):
    with pytest.raises(UsageError, match="GGUF export supports decoders"):
        export(quantized("bert", None), tmp_path / "gguf")


@pytest.mark.skipif(not llama_cpp.available(), reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_llama_cpp_runs_the_export(quantized, tmp_path, arch):
    loaded, out = export(quantized(arch, "w8a16"), tmp_path / "gguf")
    from compress.export.onnx_export import exact_reference

    exact_reference(loaded, read(loaded.checkpoint))
    assert llama_cpp_gap(loaded.model, tmp_path / "gguf" / "model.gguf") < 0.02


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert gguf_export.pre_tokenizer(byte_level) == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert gguf_export.pre_tokenizer(digits) == "smollm"
    assert (
        gguf_export.pre_tokenizer({"type": "Metaspace"}) == "default" and gguf_export.pre_tokenizer(None) == "default"
    )


def test_tied_table_takes_one_width(tiny_model, tmp_path):
    """A tied model's one token_embd serves the output layer: Q8_0 by default for integer weights (no output.weight),
    two different widths refused."""
    src = tiny_llama_like(tiny_model("llama"), tmp_path / "tied", tie_word_embeddings=True)
    with pytest.raises(UsageError, match="cannot both hold"):
        export(src, tmp_path / "two", lm_head_bits=4, embed_bits=8)
    _, out = export(src, tmp_path / "four", lm_head_bits=4)
    assert out.embed_bits == 4 and out.lm_head_bits is None and out.types["Q4_0"] == 1  # the one table
    import gguf

    assert "output.weight" not in {t.name for t in gguf.GGUFReader(out.path).tensors}
    assert out.check.table_rel_error < 0.2  # 4-bit table of random weights; the other 14 weights exact
    assert any("by GPTQ on the output layer's inputs (Q4_0)" in n for n in out.notes)  # a 4-bit output layer
