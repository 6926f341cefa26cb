"""quantize -> report -> run -> eval on a tiny model, through the real command."""

import json

import yaml

from compress.report.schema import SCHEMA_VERSION
from tests.cli.test_errors import compress


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_quantize_report_run_eval(tiny_model, tmp_path):
    src, out = tiny_model("qwen2"), tmp_path / "out"
    ok(
        compress(
            "quantize",
            src,
            "-o",
            out,
            "--scheme",
            "w8a8",
            "--no-latency",
            "--eval-tokens",
            "1024",
            "--save-recipe",
            tmp_path / "r.yaml",
        )
    )
    saved = yaml.safe_load((tmp_path / "r.yaml").read_text())
    assert saved["stages"][0]["scheme"] == "w8a8" and saved["output"] == str(out)

    rep = json.loads(ok(compress("report", out, "--json")).stdout)
    assert rep["schema_version"] == SCHEMA_VERSION
    assert rep["stages"][0]["settings"]["activations"] == "dynamic per-token int8"
    assert rep["result"]["perplexity"]["tokens"] == 1024 and rep["base"]["perplexity"]["value"] > 1
    assert "perplexity" in ok(compress("report", out)).stdout

    ok(compress("run", tmp_path / "r.yaml", "-o", tmp_path / "again", "--set", "evaluate.enabled=false"))
    assert (tmp_path / "again" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "again" / "report.json").read_text())["base"] is None

    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")

    # eval against the base: speed timed together (rounds interleaved), lm-eval task on both
    args = ("eval", out, "--baseline", src, "--eval-tokens", "1024", "--tasks", "everyday_facts", "--json")
    ev = json.loads(ok(compress(*args)).stdout)
    assert ev["result"]["perplexity"]["value"] == rep["result"]["perplexity"]["value"]
    assert ev["base"]["bytes_on_disk"] > ev["result"]["bytes_on_disk"]
    assert ev["result"]["divergence"]["positions"] == 1024 - 2 and ev["base"]["divergence"] is None  # 2 windows
    # base and result timed in one process, rounds interleaved: the ratio lies within its own rounds
    sp, lat = ev["speed"], ev["result"]["latency"]
    assert sp["rounds"] == ev["base"]["latency"]["rounds"] == lat["rounds"] == 5
    assert sp["prefill_range"][0] <= sp["prefill"] <= sp["prefill_range"][1]
    assert sp["decode_range"][0] <= sp["decode"] <= sp["decode_range"][1]
    assert lat["decode_range"][0] <= lat["decode_tokens_per_s"] <= lat["decode_range"][1]
    assert lat["prefill_tokens_per_s"] > 0 and lat["batch"] == 1 and "cpu" in lat["device"]
    assert "matmul" in lat["kernel"] and lat["prompt_len"] > 0 and lat["new_tokens"] > 0
    for m in (ev["base"], ev["result"]):
        facts = m["tasks"]["everyday_facts"]
        assert facts["samples"] == 80 and 0 <= facts["value"] <= 1 and facts["stderr"] > 0


def test_report_of_a_folder_without_one(tmp_path):
    proc = compress("report", tmp_path)
    assert proc.returncode == 2 and "no report.json" in proc.stderr
