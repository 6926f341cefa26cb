"""Calibrated methods on tiny models: better layer outputs than RTN, SmoothQuant is exact in
float, results round-trip through the saved format, and bad calibration input is explained."""

import json

import pytest
import torch
from rich.console import Console

from compress import api
from compress.errors import UsageError
from compress.formats import compressed_tensors as ct_format
from compress.models import arch
from compress.models.load import load
from compress.models.source import resolve
from compress.primitives.qparams import dequantize
from compress.primitives.smoothing import fold, smoothquant_scales
from compress.quant import schemes
from compress.quant.method import Target
from compress.quant.stage import quantize_linears
from compress.quant.table import METHODS
from compress.recipe import QuantizeStage, validate

QUIET = Console(file=open("/dev/null", "w"))


def batches(vocab: int, n: int = 8, seq: int = 64) -> list[torch.Tensor]:
    return list(torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(1)).split(4))


def run_method(model_dir, method, scheme="w4a16", **opts):
    loaded = load(resolve(str(model_dir)), dtype="float32")
    layers, ignore = arch.quant_targets(loaded.model, [])
    opts.setdefault("symmetric", True)  # these tests compare methods on the symmetric grid
    stage = QuantizeStage(scheme=scheme, method=method, group_size="auto" if scheme == "w4a16" else None, **opts)
    sch = schemes.resolve(
        stage.scheme, stage.group_size, stage.symmetric, {n: m.in_features for n, m in layers.items()}
    )
    m = METHODS[method](stage.method_options(), Target(sch.weight, sch.act))
    weights = {}
    errors = quantize_linears(
        loaded.model, layers, m, sch, batches(loaded.model.config.vocab_size), torch.device("cpu"), sink=weights.update
    )
    return loaded, layers, ignore, sch, weights, errors


@pytest.mark.parametrize("arch_name", ["llama", "opt", "gpt_neox", "bloom", "falcon"])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_method_beats_rtn_layer_error(tiny_model, arch_name, method):
    _, layers, _, _, weights, errors = run_method(tiny_model(arch_name), method)
    assert set(weights) == set(layers) and len(errors) == 2
    rtn = sum(e.rtn for e in errors)
    # random tiny models give AWQ little to exploit: 0.93-0.98x RTN's error (llama 0.1049 against 0.1071; symmetric
    # grids with the extreme on -8, which took RTN's error down 15% on llama and AWQ's 5%); GPTQ 0.66-0.73x
    assert sum(e.method for e in errors) < (0.8 if method == "gptq" else 0.99) * rtn


@pytest.mark.parametrize("method", ["smoothquant+gptq", "smoothquant+rtn"])
def test_smoothquant_methods_run_w8a8(tiny_model, method):
    _, _, _, _, _, errors = run_method(tiny_model("qwen2"), method, scheme="w8a8")
    assert all(e.method < 0.05 for e in errors)


# maps per decoder layer: llama: input norm -> qkv, v -> o (grouped-query: 2 query heads per value head, scales tied),
# post norm -> gate/up, up -> down; opt: the same with out_proj and fc1 -> fc2 (ReLU); gpt_neox and bloom: the two
# norms (GELU MLPs); falcon 7B-style: one norm before parallel attention and MLP. Without an adapter (maps proven on
# the layer): qwen3 as llama; gemma2 as llama, its norms scaling by 1 + weight; starcoder2 without up -> down (GELU)
@pytest.mark.parametrize(
    "arch_name,maps",
    [("llama", 4), ("opt", 4), ("gpt_neox", 2), ("bloom", 2), ("falcon", 1)]
    + [("qwen3", 4), ("gemma2", 4), ("starcoder2", 3)],
)
@torch.no_grad()
def test_smoothquant_folding_leaves_float_outputs_unchanged(tiny_model, arch_name, maps):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model(arch_name), dtype=torch.float32).eval()
    ids = batches(model.config.vocab_size)[0]
    before = model(ids).logits
    absmax = {}
    hooks = []
    layers = arch.decoder_layers(model)
    for i, layer in enumerate(layers):
        for m in arch.smooth_maps(model, layer):
            lin = layer.get_submodule(m.linears[0])
            hooks.append(
                lin.register_forward_hook(
                    lambda mod, a, o, key=(i, m): absmax.__setitem__(key, a[0].abs().flatten(0, 1).amax(0))
                )
            )
    model(ids)
    for h in hooks:
        h.remove()
    for (i, m), xmax in absmax.items():
        lins = [layers[i].get_submodule(n) for n in m.linears]
        s = smoothquant_scales(xmax, [lin.weight for lin in lins], 0.5, m.tie)
        fold(layers[i].get_submodule(m.prev), lins, s, prev_s=m.prev_scale(s), offset=m.offset)
    assert len(absmax) == len(layers) * maps
    assert torch.allclose(model(ids).logits, before, atol=1e-4, rtol=1e-4)


def test_actorder_groups_round_trip_through_saved_checkpoint(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded, layers, ignore, sch, weights, _ = run_method(tiny_model("llama"), "gptq", actorder=True)
    ct_format.compress_linears(loaded.model, ct_format.config_for(sch.weight, sch.act, ignore), weights)
    compressor = ct_format.finish(loaded.model, set(weights))
    loaded.model.save_pretrained(tmp_path)
    compressor.update_config(str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    reloaded(torch.tensor([[1, 2, 3]]))  # decompress
    for name, qw in weights.items():
        assert torch.equal(reloaded.get_submodule(name).weight, dequantize(qw.q, qw.scale, qw.zero_point))


def test_linears_outside_the_blocks_are_rounded_to_nearest(tiny_model):
    """BERT's pooler reads no calibration input in the layer-by-layer pass: GPTQ quantizes the encoder layers,
    the pooler is rounded to nearest on the same grid (what RTN alone gives it), and every linear is written."""
    from compress.quant.method import round_weights

    loaded, layers, _, sch, weights, errors = run_method(tiny_model("bert"), "gptq")
    assert "pooler.dense" in layers and set(weights) == set(layers) and len(errors) == 2
    want = round_weights(loaded.model.get_submodule("pooler.dense").weight, Target(sch.weight, sch.act))
    assert torch.equal(weights["pooler.dense"].q, want[0])
    assert torch.equal(weights["pooler.dense"].scale, want[1])


def test_no_smoothing_map_is_a_clear_error(tiny_model):
    with pytest.raises(UsageError, match="bert: no norm -> projection scale folds exactly"):
        run_method(tiny_model("bert"), "awq")


@pytest.mark.parametrize("arch_name", ["qwen3", "gemma2"])
def test_awq_without_an_adapter_beats_rtn_layer_error(tiny_model, arch_name):
    """Maps proven on the layers themselves (gemma2's norms fold through 1 + weight)."""
    _, layers, _, _, weights, errors = run_method(tiny_model(arch_name), "awq")
    assert set(weights) == set(layers)
    assert sum(e.method for e in errors) < 0.99 * sum(e.rtn for e in errors)


def quantize(src, tmp_path, **stage):
    recipe = validate(
        {
            "model": str(src),
            "output": str(tmp_path / "out"),
            "evaluate": {"enabled": False},
            "stages": [{"stage": "quantize", "scheme": "w4a16", "group_size": "auto", "method": "gptq", **stage}],
        }
    )
    return api.run(recipe, QUIET)


def test_bad_calibration_input(tiny_model, tmp_path):
    src = tiny_model("llama")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UsageError, match="holds no text"):
        quantize(src, tmp_path, dataset=str(tmp_path / "empty.txt"))
    (tmp_path / "short.txt").write_text("just a few words")
    with pytest.raises(UsageError, match="shorter than one sample"):
        quantize(src, tmp_path, dataset=str(tmp_path / "short.txt"))
    (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "text"}) + "\n")
    with pytest.raises(UsageError, match="no field 'text'"):
        quantize(src, tmp_path, dataset=str(tmp_path / "rows.jsonl"))
    assert not (tmp_path / "out").exists()


def test_fewer_samples_than_asked_warns_and_goes_on(tiny_model, tmp_path):
    src = tiny_model("llama")
    (tmp_path / "some.txt").write_text(" ".join(f"word{i}" for i in range(400)))
    report = quantize(src, tmp_path, dataset=str(tmp_path / "some.txt"), samples=50, seq_len=64)
    st = report.stages[0]
    assert st.warnings and "fewer than the 50 asked" in st.warnings[0]
    assert "samples x 64 tokens" in st.calibration and (tmp_path / "out" / "model.safetensors").is_file()


def test_value_scales_are_tied_per_group_of_query_heads(tiny_model):
    """Grouped-query attention: value channel c of kv head h feeds channel c of every query head of h's group, so the
    v_proj -> o_proj scale is one per value channel; an untied one is refused, not folded wrong."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32)
    layer = arch.decoder_layers(model)[0]
    (m,) = [m for m in arch.smooth_maps(model, layer) if m.prev == "self_attn.v_proj"]
    kv, rep, dim = m.repeat
    assert (kv, rep) == (model.config.num_key_value_heads, 2) and kv * rep * dim == layer.self_attn.o_proj.in_features
    t = torch.arange(kv * rep * dim, dtype=torch.float32)
    tied = m.tie(t, "amax")
    assert torch.equal(tied.reshape(kv, rep, dim)[:, 0], t.reshape(kv, rep, dim)[:, -1])  # each group's largest
    assert torch.equal(m.prev_scale(tied), t.reshape(kv, rep, dim)[:, -1].reshape(-1))
    with pytest.raises(ValueError, match="differs within a group of query heads"):
        m.prev_scale(t)
