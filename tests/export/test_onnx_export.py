"""ONNX export on tiny random models of each supported family and every scheme: the file
carries the checkpoint's integers exactly, and ONNX Runtime matches PyTorch."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compress.errors import UsageError
from compress.export import onnx_decoder, onnx_export, onnx_genai, tables
from compress.export.onnx_graph import NBits, dequantize_nbits
from compress.formats.stored import read
from compress.models.load import load
from compress.models.source import resolve
from compress.runtime import ort
from compress.runtime.loop import generate
from compress.runtime.torch_decoder import TorchDecoder


def export(ckpt, dest, **opts):
    loaded = load(resolve(str(ckpt)), dtype="float32", quantized=True)
    dest.mkdir()
    return loaded, onnx_export.export(loaded, dest, onnx_decoder.Options(**opts), threads=1)


def unpack(packed: np.ndarray, bits: int, n: int, k: int) -> np.ndarray:
    """MatMulNBits' codes: 8/bits to a byte, the first in the lowest bits, offset by 2**(bits-1)."""
    per_byte, mask = 8 // bits, (1 << bits) - 1
    codes = np.stack([(packed >> (i * bits)) & mask for i in range(per_byte)], -1)
    return codes.reshape(n, k).astype(np.int16) - (1 << (bits - 1))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])  # qwen3: per-head query and key norms
@pytest.mark.parametrize("scheme", [None, "w4a16", "w8a16", "w8a8", "w8a8-asym"])
def test_decoder_matches_pytorch(quantized, tmp_path, arch, scheme):
    loaded, exp = export(quantized(arch, scheme), tmp_path / "onnx", accuracy_level=0)
    c = exp.check
    assert exp.act_int8 == (scheme in ("w8a8", "w8a8-asym"))
    assert exp.act_zero_point == (scheme == "w8a8-asym")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph.node}
    assert ("ReduceMin" in ops) == exp.act_zero_point  # each token's minimum sets its zero point
    if exp.act_int8:  # inputs rounded to int8 per token on both sides: a rounding boundary may flip
        assert c.top1_agreement >= 0.95 and c.max_abs_logit_diff < 0.05 * max(1.0, c.logit_scale)
    else:
        assert c.top1_agreement == 1.0 and c.greedy_equal == c.greedy_of == 16
        assert c.max_abs_logit_diff < 1e-3 * max(1.0, c.logit_scale)
    # qkv + o + gate/up + down per layer, and the output layer at 8 bits by default for integer weights
    assert exp.nbits_layers == (0 if scheme is None else 2 * 4 + 1)
    assert exp.lm_head_bits == (None if scheme is None else 8)
    info = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert info["check"]["greedy_equal"] == 16
    # the file's perplexity and KL divergence from the checkpoint in PyTorch, on both built-in evaluation texts
    assert [q["text"] for q in info["quality"]] == ["built-in", "licenses"]
    for q in info["quality"]:
        assert q["tokens"] == 2 * 511 and q["kl_mean"] >= 0
        if not exp.act_int8:  # exact kernels: the same distributions
            assert abs(q["perplexity"] / q["perplexity_pytorch"] - 1) < 1e-4 and q["kl_mean"] < 1e-5
    # the standard decoder interface
    sess = ort.session(tmp_path / "onnx" / "model.onnx", 1)
    names = [i.name for i in sess.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and "past_key_values.1.value" in names
    assert [o.name for o in sess.get_outputs()][:2] == ["present.0.key", "present.0.value"]


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16", "w2a16"])
def test_integers_carried_over_exactly(quantized, tmp_path, scheme):
    ckpt = quantized("llama", scheme)
    export(ckpt, tmp_path / "onnx")
    stored = read(ckpt)
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp"
        gate, up = stored[f"{p}.gate_proj"], stored[f"{p}.up_proj"]
        n, k = gate.q.shape[0] * 2, gate.q.shape[1]
        q = unpack(inits[f"{p}.gate_up_proj.qweight"], gate.bits, n, k)
        assert np.array_equal(q, torch.cat([gate.q, up.q]).numpy())
        scales = inits[f"{p}.gate_up_proj.scales"].reshape(n, -1)
        per_block = scales.shape[1] // gate.scale.shape[1]
        assert np.array_equal(scales, np.repeat(torch.cat([gate.scale, up.scale]).numpy(), per_block, axis=1))


def test_int2_runs_as_matmulnbits_and_int3_says_why_not(quantized, tmp_path):
    _, exp = export(quantized("llama", "w2a16"), tmp_path / "w2", accuracy_level=0)
    assert exp.nbits_layers == 2 * 4 + 1 and exp.check.top1_agreement == 1.0
    assert exp.check.max_abs_logit_diff < 1e-3 * max(1.0, exp.check.logit_scale)
    _, exp = export(quantized("llama", "w3a16"), tmp_path / "w3", accuracy_level=0)
    assert exp.nbits_layers == 1 and exp.check.top1_agreement == 1.0  # the 8-bit output layer alone
    assert any("14 int3 linears" in n and "takes 2, 4, 8 bits" in n for n in exp.notes), exp.notes


def test_generation_loop_matches_transformers(quantized, tmp_path):
    # float tables: every matmul exact (the default 8-bit output layer rounds activations), so greedy must match
    loaded, _ = export(quantized("llama", "w4a16"), tmp_path / "onnx", lm_head_bits=0, embed_bits=0)
    dec = ort.OrtDecoder(ort.session(tmp_path / "onnx" / "model.onnx", 1))
    dec.GROW = 3  # the in-place cache fills and grows several times within the 12 tokens
    prompt = np.array([[5, 17, 99, 3, 250, 11, 7, 8]] * 2, dtype=np.int64)  # batch 2
    want = generate(TorchDecoder(loaded.model, ""), prompt, 12)
    assert np.array_equal(generate(dec, prompt, 12), want)
    assert dec._cache[0].shape[2] > 8 + 3  # grown
    assert dec._shrink is not None  # our sessions have an arena: a prompt's peak is handed back after it
    # a caller's session without a memory arena: the loop must not ask it to shrink one (ONNX Runtime raises)
    import onnxruntime

    so = onnxruntime.SessionOptions()
    so.enable_cpu_mem_arena = False
    path = str(tmp_path / "onnx" / "model.onnx")
    plain = ort.OrtDecoder(onnxruntime.InferenceSession(path, so, providers=["CPUExecutionProvider"]))
    assert plain._shrink is None
    assert np.array_equal(generate(plain, prompt, 12), want)


def test_default_accuracy_level(quantized):
    assert onnx_decoder.resolved(onnx_decoder.Options(), read(quantized("llama", "w4a16"))).accuracy_level == 0
    assert onnx_decoder.resolved(onnx_decoder.Options(), read(quantized("llama", "w8a16"))).accuracy_level == 4
    assert onnx_decoder.resolved(onnx_decoder.Options(1), read(quantized("llama", "w8a16"))).accuracy_level == 1


def test_accuracy_level_4_and_quantized_output_layer(quantized, tmp_path):
    _, exp = export(quantized("llama", "w4a16"), tmp_path / "onnx", accuracy_level=4, lm_head_bits=8)
    assert exp.nbits_layers == 2 * 4 + 1  # the output layer too
    assert exp.check.top1_agreement >= 0.8
    assert any("accuracy_level 4" in n for n in exp.notes)


def test_quantized_output_layer_is_exact_at_level_0(quantized, tmp_path):
    _, exp = export(quantized("qwen2", "w4a16"), tmp_path / "onnx", accuracy_level=0, lm_head_bits=4)
    assert exp.check.top1_agreement == 1.0 and exp.check.max_abs_logit_diff < 1e-4


def test_fp8_is_written_dequantized_with_a_note(quantized, tmp_path):
    _, exp = export(quantized("llama", "fp8"), tmp_path / "onnx")
    assert exp.nbits_layers == 0 and exp.check.greedy_equal == 16
    assert any("fp8" in n for n in exp.notes)


def test_encoder(quantized, tmp_path):
    _, exp = export(quantized("bert", "w8a16"), tmp_path / "onnx")
    assert exp.task == "encoder" and exp.nbits_layers == 2 * 4  # qkv, attention output, intermediate, output
    assert exp.check.min_cosine > 0.9999


def test_unsupported_architecture(quantized, tmp_path):
    with pytest.raises(UsageError, match="decoders of type"):
        export(quantized("phi3", None), tmp_path / "onnx")
    with pytest.raises(UsageError, match="this model is 'qwen3_moe'"):  # refused before its experts are looked up
        export(quantized("qwen3_moe", "w4a16", group_size=32), tmp_path / "moe")


def test_encoder_padding_mask(quantized, tmp_path):
    loaded, _ = export(quantized("bert", "w4a16"), tmp_path / "onnx")
    from compress.export.onnx_encoder import feed

    sess = ort.session(tmp_path / "onnx" / "model.onnx", 1)
    ids = np.array([[101, 7, 8, 9, 10, 102], [101, 7, 8, 102, 0, 0]], dtype=np.int64)
    mask = (np.arange(6)[None] < np.array([[6], [4]])).astype(np.int64)
    got = sess.run(["last_hidden_state"], feed(sess, ids, mask))[0]
    with torch.no_grad():
        want = loaded.model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).last_hidden_state.numpy()
    keep = mask.astype(bool)
    np.testing.assert_allclose(got[keep], want[keep], atol=1e-4)


def test_an_export_that_computes_something_else_is_an_error():
    from compress.errors import CompressError

    def verdict(**check):
        diff = check.pop("diff", 1e-5)
        c = onnx_export.Check(tokens=64, max_abs_logit_diff=diff, logit_scale=30.0, **check)
        onnx_export._verify(onnx_export.Exported(None, "causal-lm", 8, 0, 0, None, False, c, []))

    verdict(top1_agreement=1.0, greedy_equal=16, greedy_of=16)  # passes
    with pytest.raises(CompressError, match="logits differ"):
        verdict(diff=2.0, top1_agreement=1.0)
    with pytest.raises(CompressError, match="next-token predictions"):
        verdict(top1_agreement=0.5)
    with pytest.raises(CompressError, match="hidden states"):
        verdict(min_cosine=0.9)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_embedding_is_exact_to_its_rounding(quantized, tmp_path, bits):
    """--embed-bits: the embedding is GatherBlockQuantized rows of the rounded table, no float copy is stored, and
    ONNX Runtime matches PyTorch given the same rounded table (untied output layer: its own table, float when asked)."""
    ckpt = quantized("llama", "w4a16")
    loaded, exp = export(ckpt, tmp_path / "onnx", accuracy_level=0, embed_bits=bits, lm_head_bits=0)
    assert exp.embed_bits == bits and exp.lm_head_bits is None
    assert exp.check.top1_agreement == 1.0 and exp.check.greedy_equal == exp.check.greedy_of
    assert exp.check.max_abs_logit_diff < 1e-3 * max(1.0, exp.check.logit_scale)
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    assert [n.op_type for n in graph.node].count("GatherBlockQuantized") == (2 if bits == 4 else 1)  # + wide rows
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    assert "model.embed_tokens.weight" not in inits and "lm_head.weight" in inits
    weight = loaded.model.get_input_embeddings().weight  # the checkpoint's table, rounded to nearest in the file
    block = 32 if bits == 8 else tables.TABLE_GRID[1]  # 4 bits: a zero point per block of 16
    table = [inits[f"model.embed_tokens.{k}"] for k in ("qweight", "scales")]
    assert table[1].dtype == np.float16 and ("model.embed_tokens.qzeros" in inits) == (bits == 4)
    stored = NBits(*table, inits.get("model.embed_tokens.qzeros"), bits, block, 64, len(weight))
    want = dequantize_nbits(onnx_decoder.quantized_table(weight, bits, "--embed-bits"))
    assert np.array_equal(dequantize_nbits(stored), want) and not np.array_equal(want, weight.detach().numpy())


def test_tied_output_layer_shares_the_quantized_embedding(tiny_model, tmp_path):
    """A model whose output layer is its embedding stores one 4-bit table, read by GatherBlockQuantized and
    MatMulNBits; another width for the output layer is refused (it would store the table twice)."""
    from tests.conftest import tiny_llama_like

    src = tiny_llama_like(tiny_model("llama"), tmp_path / "tied", tie_word_embeddings=True)
    _, plain = export(src, tmp_path / "plain")
    _, exp = export(src, tmp_path / "onnx", embed_bits=4)
    assert exp.lm_head_bits == 4 and any("shared with the tied output layer" in n for n in exp.notes)
    assert any("by GPTQ on the output layer's inputs" in n for n in exp.notes)  # a 4-bit output layer is calibrated
    assert exp.check.top1_agreement == 1.0
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    views = {"model.embed_tokens.qweight"} | {  # the lookup reads the same bytes viewed as [rows, bytes]
        n.output[0] for n in graph.node if n.op_type == "Reshape" and n.input[0] == "model.embed_tokens.qweight"
    }
    readers = [n.op_type for n in graph.node if n.op_type != "Reshape" and views & set(n.input)]
    assert sorted(readers) == ["GatherBlockQuantized", "MatMulNBits"]
    casts = [n for n in graph.node if n.op_type == "Cast" and n.input[0] == "model.embed_tokens.scales"]
    assert len(casts) == 1  # the float16 scales are cast once for both readers
    assert not any(t.name.startswith("lm_head") or t.name == "model.embed_tokens.weight" for t in graph.initializer)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]  # the tokenizer's length
    table = vocab * 64 * 4  # the float32 table the plain export stores once
    saved = (tmp_path / "plain" / "model.onnx").stat().st_size - (tmp_path / "onnx" / "model.onnx").stat().st_size
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    refined = sum(a.nbytes for n, a in inits.items() if n.startswith("model.embed_tokens.refined"))
    assert saved + refined > 0.8 * table  # 4 bits + a float16 scale and a 4-bit zero point per 16 for 32 bits
    with pytest.raises(UsageError, match="store it twice"):
        export(src, tmp_path / "twice", embed_bits=4, lm_head_bits=8)
    # the most used rows refined by default, on both sides, exact at level 0 (the check above: top-1 1.0)
    assert exp.refined_rows == tables.REFINED_ROWS and any(
        f"{tables.REFINED_ROWS} rows of the tokens most read" in n for n in exp.notes
    )
    rows = inits["model.embed_tokens.refined_rows"]
    assert len(rows) == tables.REFINED_ROWS and np.all(np.diff(rows) > 0)
    assert inits["model.embed_tokens.refined.qweight"].shape == (tables.REFINED_ROWS, 4, 8)  # 4 bits, blocks of 16
    ops = [n.op_type for n in graph.node]
    assert ops.count("GatherBlockQuantized") == 2 and ops.count("ScatterElements") == 1
    assert exp.check.greedy_equal == exp.check.greedy_of and exp.check.max_abs_logit_diff < 1e-3 * exp.check.logit_scale
    _, plain_table = export(src, tmp_path / "plain-table", embed_bits=4, refined_rows=0)
    assert plain_table.refined_rows == 0 and not any("rows of the tokens" in n for n in plain_table.notes)
    kl = [q.kl_mean for q in exp.quality]
    assert all(a < b for a, b in zip(kl, (q.kl_mean for q in plain_table.quality))), (kl, plain_table.quality)
    grown = (tmp_path / "onnx" / "model.onnx").stat().st_size - (tmp_path / "plain-table" / "model.onnx").stat().st_size
    assert 0 < grown < tables.REFINED_ROWS * (32 + 4 * 2 + 8) + 2 * vocab + 4096  # codes, scales, indices, slots
    with pytest.raises(UsageError, match="--refined-rows applies to a 4-bit"):
        export(src, tmp_path / "eight", embed_bits=8, refined_rows=16)


def test_an_8_bit_output_layer_runs_at_level_4_by_default(quantized, tmp_path):
    """ONNX Runtime's 8-bit float32 path is slow: an 8-bit output layer gets level 4 unless a level is asked, the
    4-bit linears keep level 0 (exact), and the check holds it to the not-exact bar."""
    _, exp = export(quantized("llama", "w4a16"), tmp_path / "onnx", lm_head_bits=8)
    assert exp.accuracy_level == 0 and exp.head_accuracy_level == 4
    assert any("output layer: 8-bit MatMulNBits at accuracy_level 4" in n for n in exp.notes)
    levels = {
        n.name: next(a.i for a in n.attribute if a.name == "accuracy_level")
        for n in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.node
        if n.op_type == "MatMulNBits"
    }
    assert sorted(levels.values()) == [0] * 8 + [4]
    _, asked = export(quantized("llama", "w4a16"), tmp_path / "asked", accuracy_level=0, lm_head_bits=8)
    assert asked.head_accuracy_level is None


def test_table_widths_by_default():
    """Integer weights: an 8-bit output layer, one 8-bit table when tied; float checkpoints stay float; 0 asks for
    float32; a tied model given one width uses it for both."""
    widths = lambda quantized, tied, **asked: (  # noqa: E731
        (o := onnx_export.table_widths(onnx_decoder.Options(**asked), quantized, tied)).lm_head_bits,
        o.embed_bits,
    )
    assert widths(True, False) == (8, None) and widths(True, True) == (8, 8)
    assert widths(False, False) == widths(False, True) == (None, None)
    assert widths(True, True, lm_head_bits=0) == (None, None) and widths(True, False, lm_head_bits=0) == (None, None)
    assert widths(True, True, embed_bits=4) == (4, 4) and widths(False, True, lm_head_bits=8) == (8, 8)
    assert widths(True, False, embed_bits=4) == (8, 4) and widths(True, True, embed_bits=0) == (None, None)
    assert widths(True, True, lm_head_bits=8, embed_bits=0) == (8, None)  # both asked: kept (two tensors)


def test_float_output_layer_when_asked(quantized, tmp_path):
    _, exp = export(quantized("llama", "w4a16"), tmp_path / "onnx", lm_head_bits=0)
    assert exp.lm_head_bits is None and exp.nbits_layers == 2 * 4 and exp.check.top1_agreement == 1.0
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    assert "lm_head.weight" in {t.name for t in graph.initializer}


@pytest.mark.skipif(not onnx_genai.available(), reason="onnxruntime-genai is not installed (the test extra has it)")
def test_onnx_runtime_genai_runs_the_directory(quantized, tmp_path):
    """genai_config.json names our graph's inputs and outputs: onnxruntime-genai loads the directory as is, its
    tokenizer reads the copied tokenizer.json, and its greedy tokens are transformers' on the same weights."""
    import onnxruntime_genai as og

    loaded, exp = export(quantized("qwen2", "w4a16"), tmp_path / "onnx", accuracy_level=0, lm_head_bits=0)
    assert exp.check.genai_greedy_equal == 16
    cfg = json.loads((tmp_path / "onnx" / onnx_genai.FILE).read_text())
    assert cfg["model"]["decoder"]["num_hidden_layers"] == 2 and cfg["model"]["decoder"]["filename"] == "model.onnx"
    model = og.Model(str(tmp_path / "onnx"))
    ids = og.Tokenizer(model).encode("The quick brown fox jumps over")
    assert list(ids) == loaded.tokenizer("The quick brown fox jumps over", add_special_tokens=False).input_ids
    got = onnx_genai.greedy(tmp_path / "onnx", np.asarray(ids), 12)
    want = generate(TorchDecoder(loaded.model, ""), np.asarray([ids], dtype=np.int64), 12)[0]
    assert np.array_equal(got, want)
