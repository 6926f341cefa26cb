"""A run that succeeds did what it says: weights that do not cover their config, non-finite
weights, changed inputs under --resume, a second run on the same output, reports whose stored
verdicts disagree with their numbers, and bad input of every kind end in a one-line error."""

import errno
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from compress.errors import CompressError
from compress.formats.atomic import atomic_dir, output_lock
from tests.cli.test_errors import assert_one_line_error, compress


def edited(src, tmp_path, change):
    dest = tmp_path / "model"
    shutil.copytree(src, dest)
    tensors = load_file(dest / "model.safetensors")
    change(tensors)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def drop_layer(t):
    for k in [k for k in t if k.startswith("model.layers.1.")]:
        del t[k]


def nan_weight(t):
    t["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")


@pytest.mark.parametrize(
    "change,needle",
    [
        (
            lambda t: t.pop("model.layers.0.mlp.down_proj.weight"),
            "lack 1 tensors the config needs: model.layers.0.mlp.down_proj",
        ),
        (drop_layer, "model.layers.1."),
        (
            lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(64, 64, dtype=torch.bfloat16)}),
            "model.layers.0.mlp.up_proj.weight has shape",
        ),
        (nan_weight, "model.layers.0.mlp.up_proj.weight holds non-finite values"),
    ],
    ids=["missing-tensor", "fewer-layers", "shape", "nan"],
)
@pytest.mark.parametrize("offload", [False, True], ids=["memory", "offload"])
def test_weights_that_do_not_cover_the_config_are_refused(tiny_model, tmp_path, change, needle, offload):
    if offload and "shape" in needle:
        pytest.skip("--offload loads each layer with strict shapes: transformers' own message")
    src = edited(tiny_model("llama"), tmp_path, change)
    extra = ["--offload"] if offload else []
    line = assert_one_line_error(
        compress("quantize", src, "-o", tmp_path / "o", "--scheme", "w8a16", "--no-eval", *extra), 2
    )
    key = needle.split(":")[0] if offload and "lack" in needle else needle
    assert (key if not offload or "nan" not in needle else "non-finite") in line
    assert not (tmp_path / "o").exists()


def test_resume_refuses_changed_inputs(tiny_model, tmp_path):
    src = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), src)
    r = tmp_path / "r.yaml"
    r.write_text(
        f"model: {src}\nstages:\n  - {{stage: prune, method: magnitude}}\n"
        "  - {stage: quantize, scheme: w8a16, ignore: [nothing.matches.this]}\nevaluate: {enabled: false}\n"
    )
    assert_one_line_error(compress("run", r, "-o", tmp_path / "out"), 2)  # stage 0 kept, stage 1 refused
    assert (tmp_path / ".out.partial" / "stages").is_dir()
    (src / "config.json").write_text((src / "config.json").read_text() + "\n")
    line = assert_one_line_error(compress("run", r, "-o", tmp_path / "out", "--resume"), 2)
    assert "changed since the interrupted run" in line and str(src) in line


def test_a_second_run_on_the_same_output_is_refused(tiny_model, tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        line = assert_one_line_error(
            compress("quantize", tiny_model("llama"), "-o", out, "--scheme", "w8a16", "--no-eval"), 2
        )
    assert f"pid {os.getpid()}" in line and not out.exists()
    assert not (tmp_path / ".out.lock").exists()


def test_a_full_disk_says_how_much_was_needed_and_free(tmp_path):
    with pytest.raises(CompressError, match=r"no space left .*needed about 100 MiB, free [\d,]+ MiB"):
        with atomic_dir(tmp_path / "out", False, needed=100 * 2**20):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_report_rederives_gate_verdicts_and_reads_nan(tiny_model, tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text(
        f"model: {tiny_model('llama')}\nstages:\n  - {{stage: quantize, scheme: w8a16}}\n"
        "evaluate: {latency: false, max_tokens: 256}\ngates: {max_ppl_increase: 1.0, max_size_ratio: 1.0}\n"
    )
    proc = compress("run", r, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    path = tmp_path / "out" / "report.json"
    rep = json.loads(path.read_text())
    rep["result"]["bytes_on_disk"] = 2 * rep["base"]["bytes_on_disk"]  # the numbers now fail the size gate
    path.write_text(json.dumps(rep))
    shown = compress("report", tmp_path / "out", "--json")
    assert shown.returncode == 0 and "disagree with its measured values" in shown.stderr
    again = json.loads(shown.stdout)
    assert again["passed"] is False and [g["passed"] for g in again["gates"]] == [True, False]
    rep["result"]["perplexity"]["value"] = float("nan")  # json writes NaN, as compress does ("NaN")
    path.write_text(json.dumps(rep))
    again = json.loads(compress("report", tmp_path / "out", "--json").stdout)
    assert again["gates"][0]["passed"] is False


@pytest.mark.parametrize(
    "args,needle",
    [
        (["run", "RECIPE", "--set", "stages.0.scheme=[w8a8", "-o", "OUT"], "not valid YAML"),
        (["run", "BINARY", "-o", "OUT"], "not a text file"),
        (["quantize", "TRUNCATED", "-o", "OUT"], "GGUF"),
        (["bench", "MODEL", "--prompt-len", "4000", "--new-tokens", "200"], "positions"),
        (["bench", "MODEL", "--batch", "0"], "at least 1"),
        (["run", "LONG", "-o", "OUT"], "positions; the model takes at most 2048"),
    ],
    ids=["set-yaml", "binary-recipe", "truncated-gguf", "prompt-too-long", "batch-0", "eval-prompt-too-long"],
)
def test_bad_input_exits_2(tiny_model, tmp_path, args, needle):
    from compress.models.source import resolve

    src = tiny_model("llama")
    (tmp_path / "r.yaml").write_text(f"model: {src}\nstages:\n  - {{stage: quantize, scheme: w8a16}}\n")
    (tmp_path / "long.yaml").write_text(
        f"model: {src}\nstages:\n  - {{stage: quantize, scheme: w8a16}}\nevaluate: {{prompt_len: 4000}}\n"
    )
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)) * 4)
    gguf = resolve("smollm2-135m").path
    (tmp_path / "cut.gguf").write_bytes(gguf.read_bytes()[: 1 << 20])
    subst = {
        "RECIPE": tmp_path / "r.yaml",
        "BINARY": tmp_path / "bin.yaml",
        "TRUNCATED": tmp_path / "cut.gguf",
        "OUT": tmp_path / "out",
        "LONG": tmp_path / "long.yaml",
        "MODEL": src,
    }
    line = assert_one_line_error(compress(*[subst.get(a, a) for a in args]), 2)
    assert needle in line and not (tmp_path / "out").exists()
