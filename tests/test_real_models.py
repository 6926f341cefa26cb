"""The real models shipped in PyPI packages, end to end through the CLI, with the quality
and size thresholds of the foundation issue; calibrated methods on SmolLM2 clearly better than RTN."""

import json
import subprocess
import sys
import textwrap

import pytest

from compress.report.schema import SCHEMA_VERSION
from tests.cli.test_errors import compress

pytestmark = pytest.mark.real

# scheme -> (max relative perplexity increase, max size ratio vs the bf16 checkpoint); the runs are
# `smol_runs` below, w8a8 among them SmoothQuant + GPTQ (CALIBRATED below)
SMOL = {"w8a16": (0.01, 0.62), "fp8": (0.03, 0.62), "w8a8": (0.03, 0.62), "w4a16": (0.25, 0.45)}
# Perplexity on a quarter of the default 8192 tokens, and KL divergence only where a test reads it:
# the suite's time (each run's measurement and each fresh-process check score them). Measured on 2048
# tokens (base 15.175): w8a16 +0.12%, w8a8 +2.11% (RTN; the run here is SmoothQuant + GPTQ), fp8 +2.38%, w4a16 g64
# +42.7% (RTN, the default then; GPTQ with zero points, the default now: +11.9% on 8192 tokens, benchmarks/RESULTS.md).
EVAL_TOKENS = 2048
EVAL = ["--eval-tokens", str(EVAL_TOKENS), "--no-kl-divergence"]


def run_cli(*args, fresh=False):
    """The command line in this process (see tests/cli/test_errors.compress), or a new one."""
    proc = compress(*args, fresh=fresh)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


CALIBRATION_SAMPLES = 4
# SmolLM2 quantized through the CLI once for this file (`make test` hands each file to one worker: tests in another
# file reading these would make them again on the other worker): key -> the arguments beyond
# `quantize smollm2-135m -o OUT`. Calibrated on CALIBRATION_SAMPLES windows of 512 tokens (the benchmarks use the
# default 64): each calibrated stage costs the suite 0.5-1.5 min.
# w4a16 is the demo's job (GPTQ with zero points, the default) and keeps its KL divergence from the base;
# AWQ tries 10 scales instead of 20 on the asymmetric grid, its natural one.
SMOL_RUNS = {
    "w8a16": ["--scheme", "w8a16"],
    "fp8": ["--scheme", "fp8"],
    "w4a16": ["--scheme", "w4a16", "--group-size", "64", "--samples", str(CALIBRATION_SAMPLES)],
    "w4a16-awq": ["--scheme", "w4a16", "--method", "awq", "--group-size", "64", "--samples", str(CALIBRATION_SAMPLES),
                  "--awq-grid", "10", "--no-symmetric"],
    "w8a8": ["--scheme", "w8a8", "--method", "smoothquant+gptq", "--samples", str(CALIBRATION_SAMPLES)],
}  # fmt: skip


@pytest.fixture(scope="module")
def smol_runs(tmp_path_factory):
    """key of SMOL_RUNS -> (output directory, the --json report)."""
    root = tmp_path_factory.mktemp("smol")
    runs = {}
    for key, args in SMOL_RUNS.items():
        evaluation = ["--no-latency", *(EVAL[:2] if key == "w4a16" else EVAL)]  # speed: tests/cli/test_commands.py
        proc = run_cli("quantize", "smollm2-135m", "-o", root / key, *args, *evaluation, "--json")
        runs[key] = (root / key, json.loads(proc.stdout))
    return runs


@pytest.mark.parametrize("scheme", list(SMOL))
def test_smollm2_quality_and_size(smol_runs, scheme):
    out, report = smol_runs[scheme]
    max_ppl, max_size = SMOL[scheme]
    base, result = report["base"], report["result"]
    assert result["perplexity"]["value"] <= base["perplexity"]["value"] * (1 + max_ppl)
    assert result["bytes_on_disk"] / base["bytes_on_disk"] <= max_size
    assert result["bytes_on_disk"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert (out / "report.md").read_text().count("perplexity") >= 1
    assert (out / "report.html").read_text().count('<img src="data:image/png;base64,') >= 1
    assert json.loads((out / "report.json").read_text())["schema_version"] == SCHEMA_VERSION


def test_w4a16_report_names_its_protocols(smol_runs):
    _, report = smol_runs["w4a16"]
    r = report["result"]
    assert r["bits_per_weight"] == pytest.approx(4 + (16 + 4) / 64)  # int4 + a bf16 scale and 4-bit zero point per 64
    assert r["perplexity"]["seq_len"] == 512 and r["perplexity"]["tokens"] == EVAL_TOKENS
    assert "pydoc_data" in r["perplexity"]["text"]
    assert r["peak_rss_bytes"] > r["weights_in_memory_bytes"] > 0
    div = r["divergence"]  # GPTQ with zero points (the default) on 8192 tokens: 0.115 nats, 83.5% top-1 agreement
    assert div["positions"] == (EVAL_TOKENS // 512) * 511 and 0.05 < div["kl_mean"] < 1.0 < div["kl_max"]
    assert 0.6 < div["top1_agreement"] < 0.95


FRESH = textwrap.dedent("""
    import json, math, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    texts, tokens, outs = json.load(open(sys.argv[1])), int(sys.argv[2]), sys.argv[3:]
    for out in outs:
        # float32, as compress computes on a CPU without fast bf16 (bf16 here: 4x this test's time, 0.2% apart)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(out)
        ids = tok("\\n\\n".join(texts), return_tensors="pt", add_special_tokens=False).input_ids[0]
        windows = ids[:tokens].reshape(-1, 512)
        nll = n = 0
        with torch.no_grad():
            for i in range(0, len(windows), 4):
                x = windows[i:i + 4]
                logits = model(x).logits[:, :-1].float().flatten(0, 1)
                nll += float(torch.nn.functional.cross_entropy(logits, x[:, 1:].flatten(), reduction="sum"))
                n += x[:, 1:].numel()
        print(math.exp(nll / n))
    assert not any(m == "compress" or m.startswith("compress.") for m in sys.modules)
""")


def fresh_perplexities(outs, tmp_path) -> list[float]:
    """Perplexity of each checkpoint on the report's windows, in one new process that never imports compress."""
    from compress.data.text import builtin

    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(builtin("evaluation").texts))
    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    proc = subprocess.run(
        [sys.executable, str(script), str(texts), str(EVAL_TOKENS), *map(str, outs)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [float(line) for line in proc.stdout.strip().splitlines()[-len(outs) :]]


def test_fresh_process_without_compress_reproduces_the_report(smol_runs, tmp_path):
    """GPTQ's and AWQ's asymmetric int4 (zero points packed, `dequantize` in the config) and fp8."""
    schemes = ["w4a16", "w4a16-awq", "fp8"]
    got = fresh_perplexities([smol_runs[s][0] for s in schemes], tmp_path)
    for scheme, ppl in zip(schemes, got):
        assert ppl == pytest.approx(smol_runs[scheme][1]["result"]["perplexity"]["value"], rel=0.005), scheme


def test_recipe_replay_gives_the_same_checkpoint(smol_runs, tmp_path):
    import torch
    from safetensors import safe_open

    out, _ = smol_runs["w4a16"]
    run_cli("run", out / "recipe.yaml", "-o", tmp_path / "again", "--set", "evaluate.enabled=false")
    with (
        safe_open(out / "model.safetensors", "pt") as a,
        safe_open(tmp_path / "again" / "model.safetensors", "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


@pytest.mark.parametrize(
    "scheme,min_cos", [("w8a8", 0.99), ("fp8", 0.99), ("w4a16", 0.94)]
)  # measured 0.953 (benchmarks/RESULTS.md)
def test_minilm_embeddings_stay_close(tmp_path, scheme, min_cos):
    extra = ["--group-size", "auto"] if scheme == "w4a16" else []
    proc = run_cli(
        "quantize", "minilm-l6", "-o", tmp_path / "out", "--scheme", scheme, *extra, "--no-latency", "--json"
    )
    report = json.loads(proc.stdout)
    sim = report["result"]["similarity"]
    assert sim["mean"] >= min_cos and sim["texts"] >= 100
    assert report["result"]["bytes_on_disk"] < report["base"]["bytes_on_disk"]


def _exact_torch(out):
    from compress.export.onnx_export import exact_reference
    from compress.formats.stored import read
    from compress.models.load import load
    from compress.models.source import resolve

    loaded = load(resolve(str(out)), dtype="float32", quantized=True)
    exact_reference(loaded, read(loaded.checkpoint))
    return loaded


def _windows(tokenizer, n=2, length=512):
    from compress.data.text import builtin
    from compress.eval.perplexity import token_windows

    return token_windows(tokenizer, builtin("evaluation").texts, length, n * length)


def test_smollm2_onnx_export_matches_pytorch(smol_runs, tmp_path):
    """Issue 7: the w4a16 export's greedy tokens equal PyTorch's on the same integers, and its
    perplexity is within 1% of the checkpoint's in PyTorch."""
    from compress.eval.perplexity import perplexity
    from compress.runtime import ort

    out, _ = smol_runs["w4a16"]
    float_tables = ["--embed-bits", "0", "--lm-head-bits", "0"]  # exact: the default 8-bit table runs at level 4
    info = json.loads(run_cli("export", out, "-o", tmp_path / "onnx", *float_tables, "--json").stdout)
    assert info["nbits_layers"] == 30 * 4 and info["accuracy_level"] == 0
    assert info["check"]["greedy_equal"] == 16 and info["check"]["top1_agreement"] == 1.0
    loaded = _exact_torch(out)
    windows = _windows(loaded.tokenizer)
    ref = perplexity(loaded.model, windows)
    got = ort.perplexity(ort.OrtDecoder(ort.session(tmp_path / "onnx" / "model.onnx")), [w.numpy() for w in windows])
    assert got == pytest.approx(ref, rel=0.01)
    # smaller than the fp32 weights it replaces: int4 layers, fp32 embedding shared with the output layer
    assert (tmp_path / "onnx" / "model.onnx").stat().st_size < 0.4 * 4 * 134.5e6
    # the default: one 8-bit table for embedding and output layer; its cost stated in export.json on both texts
    info = json.loads(run_cli("export", out, "-o", tmp_path / "default", "--json").stdout)
    assert info["nbits_layers"] == 30 * 4 + 1 and info["embed_bits"] == info["lm_head_bits"] == 8
    assert (tmp_path / "default" / "model.onnx").stat().st_size < 0.6 * (
        tmp_path / "onnx" / "model.onnx"
    ).stat().st_size
    assert [q["text"] for q in info["quality"]] == ["built-in", "licenses"]
    assert all(
        abs(q["perplexity"] / q["perplexity_pytorch"] - 1) < 0.01 and q["kl_mean"] < 0.01 for q in info["quality"]
    )
    assert info["check"]["genai_greedy_equal"] in (None, 16)  # None: onnxruntime-genai not installed


def test_smollm2_gguf_w8a16_round_trip(smol_runs, tmp_path):
    """Issue 7: the w8a16 GGUF reads back with the same tensors; llama.cpp (when installed)
    scores text within 1% of PyTorch."""
    import numpy as np

    from compress.runtime import llama_cpp

    out, _ = smol_runs["w8a16"]
    run_cli("export", out, "-f", "gguf", "-o", tmp_path / "gguf")
    info = json.loads((tmp_path / "gguf" / "export.json").read_text())
    # + token_embd, Q8_0 by default (tied: it is the output layer too)
    assert info["exact"] == 30 * 7 and info["requantized"] == 0 and info["types"]["Q8_0"] == 30 * 7 + 1
    assert info["check"]["verdict"] == "every exact tensor identical"
    if not llama_cpp.available():
        pytest.skip("llama-cpp-python not installed: file checked, not run")
    loaded = _exact_torch(out)
    windows = _windows(loaded.tokenizer)
    dec = llama_cpp.LlamaCppDecoder(tmp_path / "gguf" / "model.gguf", threads=2, n_ctx=512, logits_all=True)
    try:
        got = np.exp(np.concatenate([-dec.logprobs(w.tolist()) for w in windows]).mean())
        text = "def f(x):\n    return x * 12345 + 0.5  # Ünïcode, spaces   and\ttabs"
        assert (
            dec.llm.tokenize(text.encode(), add_bos=False, special=False)
            == loaded.tokenizer(text, add_special_tokens=False).input_ids
        )
    finally:
        dec.close()
    from compress.eval.perplexity import perplexity

    assert got == pytest.approx(perplexity(loaded.model, windows), rel=0.01)


def test_minilm_onnx_export(tmp_path):
    run_cli("quantize", "minilm-l6", "-o", tmp_path / "q", "--scheme", "w8a16", "--no-eval")
    info = json.loads(
        run_cli("export", tmp_path / "q", "-o", tmp_path / "onnx", "--accuracy-level", "0", "--json").stdout
    )
    assert info["task"] == "encoder" and info["nbits_layers"] == 6 * 4
    assert info["check"]["min_cosine"] > 0.9999


# key of `smol_runs` -> the method its report must name and its max perplexity increase over the base
# (CALIBRATION_SAMPLES windows of 512 tokens, scored on 2048 tokens). SmoothQuant keeps its alpha search: a fixed
# alpha 0.5 gave +0.70% with bf16 compute but +1.59% with float32 compute (COMPRESS_COMPUTE_DTYPE=float32, as on CPUs
# without fast bf16), the search +0.69% with float32 (55.7 s stage). Measured so: GPTQ +14.3% (float32 compute), AWQ
# +16.0% (symmetric; +15.4% on 20 scales), w8a8 RTN +2.1%, RTN w4a16 g64 +42.7%.
CALIBRATED = {"w4a16": ("gptq", 0.20), "w4a16-awq": ("awq", 0.30), "w8a8": ("smoothquant+gptq", 0.015)}


@pytest.mark.parametrize("key", list(CALIBRATED))
def test_calibrated_methods_beat_rtn(smol_runs, key):
    _, report = smol_runs[key]
    method, max_increase = CALIBRATED[key]
    base, ppl = report["base"]["perplexity"]["value"], report["result"]["perplexity"]["value"]
    assert ppl <= base * (1 + max_increase)
    stage = report["stages"][0]
    assert stage["settings"]["method"] == method
    assert f"{CALIBRATION_SAMPLES} samples x 512 tokens" in stage["calibration"]
    assert "even-numbered" in stage["calibration"]
    errors = stage["layer_errors"]
    assert len(errors) == 30 and sum(e["method"] for e in errors) < sum(e["rtn"] for e in errors)
