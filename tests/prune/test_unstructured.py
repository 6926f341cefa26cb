"""Magnitude, Wanda and SparseGPT on tiny models, in memory and through the command."""

import json

import pytest
import torch
from safetensors.torch import load_file

from compress.models.arch import quant_targets
from compress.primitives.masks import n_of_m_holds
from compress.prune.method import Target
from compress.prune.stage import prune_linears
from compress.prune.table import METHODS
from tests.cli.test_errors import assert_one_line_error, compress


def _model_and_batches(tiny_model, arch="llama"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model(arch), dtype=torch.float32).eval()
    torch.manual_seed(0)
    for name, m in model.named_modules():  # channels of very different size, as trained LLMs have
        if name.endswith("layernorm"):
            m.weight.data = torch.exp(1.5 * torch.randn_like(m.weight))
    batches = [torch.randint(0, 1000, (4, 32)) for _ in range(4)]
    return model, batches


def _output_error(model, pruned, batches):
    with torch.no_grad():
        ref = torch.cat([model(b).logits for b in batches])
        got = torch.cat([pruned(b).logits for b in batches])
    return float((ref - got).pow(2).sum() / ref.pow(2).sum())


@pytest.mark.parametrize("pattern", [None, (2, 4)], ids=["unstructured", "2:4"])
def test_calibrated_methods_beat_magnitude(tiny_model, pattern):
    import copy

    base, batches = _model_and_batches(tiny_model)
    errs = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(base)
        targets, _ = quant_targets(model, [])
        cls = METHODS[method]
        report = prune_linears(model, targets, cls(cls.Options(), Target(0.5, pattern)), batches, torch.device("cpu"))
        assert len(report) == (2 if cls.calibrated else 0) and all(e.method > 0 for e in report)
        for name, lin in targets.items():
            zeros = float((lin.weight == 0).float().mean())
            assert zeros == pytest.approx(0.5, abs=0.01), name
            if pattern:
                assert n_of_m_holds(lin.weight, *pattern)
        errs[method] = _output_error(base, model, batches)
    assert errs["sparsegpt"] < errs["magnitude"] and errs["wanda"] < errs["magnitude"]


def test_prune_command_2_4_sparse_storage_reads_back(tiny_model, tmp_path):
    src, out = tiny_model("qwen2"), tmp_path / "out"
    proc = compress(
        "prune",
        src,
        "-o",
        out,
        "--method",
        "sparsegpt",
        "--pattern",
        "2:4",
        "--storage",
        "sparse",
        "--samples",
        "8",
        "--seq-len",
        "32",
        "--no-latency",
        "--eval-tokens",
        "512",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(proc.stdout)
    cfg = json.loads((out / "config.json").read_text())["compress_sparsity"]
    assert cfg["storage"] == "sparse" and cfg["pattern"] == "2:4" and cfg["sparsity"] == pytest.approx(0.5)
    tensors = load_file(out / "model.safetensors")
    assert any(k.endswith(".weight_bitmask") for k in tensors) and "model.layers.0.mlp.down_proj.weight" not in tensors
    assert rep["result"]["bits_per_weight"] == pytest.approx(
        0.5 * (8 + 4) + 1, abs=0.02
    )  # bf16: sign+mantissa byte, 4-bit exponent code, mask bit
    layer_sp = rep["stages"][0]["layer_sparsity"]
    assert len(layer_sp) == 14 and all(e["sparsity"] == pytest.approx(0.5) for e in layer_sp)
    assert any("no speed-up" in n for n in rep["notes"])

    # compress reads it back: eval (same perplexity as the report) and quantize (zeros kept)
    ev = json.loads(compress("eval", out, "--eval-tokens", "512", "--json").stdout)
    assert "2:4 sparsity unused" in ev["result"]["latency"]["kernel"]  # CPU: the report's latency says so
    # Same weights, two processes: a random tiny model's perplexity (~5e4) magnifies float noise in the matmuls
    # (measured 1.5e-5 apart once on a loaded machine); a wrong read-back is off by far more.
    assert ev["result"]["perplexity"]["value"] == pytest.approx(rep["result"]["perplexity"]["value"], rel=1e-4)
    assert (
        ev["result"]["bytes_on_disk"] == rep["result"]["bytes_on_disk"]
        and ev["result"]["bits_per_weight"] == rep["result"]["bits_per_weight"]
    )
    q = tmp_path / "q"
    proc = compress(
        "quantize",
        out,
        "-o",
        q,
        "--scheme",
        "w8a16",
        "--method",
        "gptq",
        "--samples",
        "8",
        "--seq-len",
        "32",
        "--no-eval",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(q)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # compressed-tensors decompresses on the first forward
    w = model.model.layers[0].mlp.down_proj.weight
    assert n_of_m_holds(w, 2, 4)
    assert json.loads((q / "config.json").read_text())["compress_sparsity"]["pattern"] == "2:4"

    # and export reads the sparse storage: the ONNX graph holds the 2:4 weights, matching PyTorch
    import onnx
    from onnx import numpy_helper

    proc = compress("export", out, "-o", tmp_path / "onnx", "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["check"]["greedy_equal"] == 16
    inits = {
        t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.initializer
    }
    assert n_of_m_holds(torch.from_numpy(inits["model.layers.0.mlp.down_proj.weight"].T.copy()), 2, 4)

    # bench reads it too, and says the 2:4 pattern buys nothing on CPU
    proc = compress("bench", out, "--prompt-len", "8", "--new-tokens", "2", "--rounds", "1", "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2:4 sparsity unused" in json.loads(proc.stdout)["rows"][0]["kernel"]


def test_prune_then_quantize_recipe_keeps_sparsity(tiny_model, tmp_path):
    import yaml

    recipe = {
        "model": str(tiny_model("llama")),
        "stages": [
            {"stage": "prune", "method": "wanda", "pattern": "2:4", "samples": 8, "seq_len": 32},
            {"stage": "quantize", "scheme": "w4a16", "method": "gptq", "group_size": 32, "samples": 8, "seq_len": 32},
        ],
        "evaluate": {"enabled": False},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    proc = compress("run", tmp_path / "r.yaml", "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # compressed-tensors decompresses on the first forward
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            assert n_of_m_holds(m.weight, 2, 4), name


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--sparsity", "1.0"], "sparsity"),
        (["--sparsity", "0"], "sparsity"),
        (["--pattern", "4:4"], "0 < N < M"),
        (["--method", "wanda", "--pattern", "2:3"], "divisible by 3"),
        (["--pattern", "2:3"], "M must divide"),
        (["--method", "sparsegpt", "--mlp-keep", "0.5"], "belong to method structured"),
        (["--method", "structured"], "needs drop_layers"),
        (["--method", "prune-me"], "method"),
    ],
)
def test_bad_prune_options(tiny_model, tmp_path, args, needle):
    out = tmp_path / "out"
    line = assert_one_line_error(
        compress("prune", tiny_model("llama"), "-o", out, "--no-eval", "--samples", "4", "--seq-len", "32", *args), 2
    )
    assert needle in line and not out.exists()


def test_sparse_storage_cannot_be_quantized_in_one_recipe(tiny_model, tmp_path):
    import yaml

    recipe = {
        "model": str(tiny_model("llama")),
        "output": str(tmp_path / "o"),
        "stages": [
            {"stage": "prune", "method": "magnitude", "storage": "sparse"},
            {"stage": "quantize", "scheme": "w8a16"},
        ],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert "storage: sparse cannot be combined" in assert_one_line_error(compress("run", tmp_path / "r.yaml"), 2)
