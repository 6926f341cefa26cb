"""Distillation on the real SmolLM2-135M: a layer-dropped student gets better, and the saved
checkpoint reloads in plain transformers with the perplexity the training process measured."""

import json

import pytest

from tests.cli.test_errors import compress

pytestmark = pytest.mark.real


def test_distilling_a_layer_dropped_smollm2_lowers_its_perplexity(tmp_path):
    pruned, out = tmp_path / "drop", tmp_path / "healed"
    proc = compress(
        "prune",
        "smollm2-135m",
        "-o",
        pruned,
        "--method",
        "structured",
        "--drop-layers",
        "8",
        "--samples",
        "8",
        "--seq-len",
        "256",
        "--no-eval",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = compress(
        "distill",
        "--teacher",
        "smollm2-135m",
        "--student",
        pruned,
        "-o",
        out,
        "--steps",
        "8",
        "--seq-len",
        "128",
        "--eval-tokens",
        "2048",
        "--no-latency",
        "--no-kl-divergence",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(proc.stdout)
    t = rep["stages"][0]["training"]
    assert t["teacher_perplexity"] < 25 < t["student_perplexity_before"]
    assert t["student_perplexity_after"] < 0.7 * t["student_perplexity_before"]
    # the saved (bf16) checkpoint, reloaded by plain transformers, scores what the trained model scored
    assert rep["result"]["perplexity"]["value"] == pytest.approx(t["student_perplexity_after"], rel=0.03)
    assert rep["result"]["parameters"] == rep["base"]["parameters"]  # the student's shape is kept
