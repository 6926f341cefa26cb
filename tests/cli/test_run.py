"""`compress run`: gates and exit codes, --dry-run, --resume after a kill, --set."""

import json

import pytest

from tests.cli.test_errors import assert_one_line_error, compress


def recipe(tmp_path, src, gates: str, stages: str = "  - {stage: quantize, scheme: w8a16}") -> str:
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {src}\nstages:\n{stages}\nevaluate: {{latency: false, max_tokens: 256}}\ngates: {gates}\n")
    return path


def test_gates_pass_exit_0(tiny_model, tmp_path):
    gates = "{max_ppl_increase: 0.5, max_kl_divergence: 0.1, max_size_ratio: 1.0, max_peak_memory: 8GiB}"
    proc = compress("run", recipe(tmp_path, tiny_model("llama"), gates), "-o", tmp_path / "out", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(proc.stdout)
    assert rep["passed"] is True and [g["name"] for g in rep["gates"]] == [
        "max_ppl_increase",
        "max_kl_divergence",
        "max_size_ratio",
        "max_peak_memory",
    ]
    assert all(g["passed"] and g["value"] is not None for g in rep["gates"])
    div = rep["result"]["divergence"]  # one window of 256 tokens: 255 predicted positions
    assert div["positions"] == 255 and 0 < div["kl_mean"] <= div["kl_p99"] <= div["kl_max"]
    assert 0.5 < div["top1_agreement"] <= 1 and rep["base"]["divergence"] is None
    shown = compress("report", tmp_path / "out")
    assert shown.returncode == 0 and "all passed" in shown.stdout


def test_a_missed_gate_exits_1_and_still_writes(tiny_model, tmp_path):
    r = recipe(tmp_path, tiny_model("llama"), "{max_size_ratio: 0.1, max_kl_divergence: 0.0}")
    msg = assert_one_line_error(compress("run", r, "-o", tmp_path / "out"), 1)
    assert "max_size_ratio" in msg and "2 of 2 gates failed" in msg
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["passed"] is False and rep["gates"][1]["value"] > 0.1 and rep["gates"][0]["value"] > 0
    assert "FAIL" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize(
    "gates, needle",
    [
        ("{min_embedding_similarity: 0.99}", "for encoders"),
        ("{max_peak_memory: lots}", "gates.max_peak_memory"),
        ("{max_size_ratoi: 0.5}", "gates.max_size_ratoi"),
    ],
)
def test_bad_gates_exit_2(tiny_model, tmp_path, gates, needle):
    msg = assert_one_line_error(
        compress("run", recipe(tmp_path, tiny_model("llama"), gates), "-o", tmp_path / "out"), 2
    )
    assert needle in msg and not (tmp_path / "out").exists()


def test_kl_gate_needs_the_divergence_measured(tiny_model, tmp_path):
    r = recipe(tmp_path, tiny_model("llama"), "{max_kl_divergence: 0.1}")
    msg = assert_one_line_error(compress("run", r, "-o", tmp_path / "o", "--set", "evaluate.kl_divergence=false"), 2)
    assert "kl_divergence" in msg and not (tmp_path / "o").exists()
    msg = assert_one_line_error(
        compress("run", recipe(tmp_path, tiny_model("bert"), "{max_kl_divergence: 0.1}"), "-o", tmp_path / "o"), 2
    )
    assert "encoder" in msg


def test_speed_gate_needs_latency(tiny_model, tmp_path):
    msg = assert_one_line_error(
        compress("run", recipe(tmp_path, tiny_model("llama"), "{min_speedup: 1.2}"), "-o", tmp_path / "o"), 2
    )
    assert "latency" in msg


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_model, tmp_path):
    r = recipe(
        tmp_path,
        tiny_model("llama"),
        "{max_size_ratio: 0.8}",
        "  - {stage: prune, method: magnitude}\n  - {stage: distill, steps: 2}\n  - {stage: quantize, scheme: w4a16, "
        "group_size: 32}",
    )
    proc = compress("run", r, "-o", tmp_path / "out", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "distill" in proc.stdout and "disk needed" in proc.stdout and "nothing was loaded" in proc.stdout
    assert list(tmp_path.iterdir()) == [tmp_path / "r.yaml"]


def test_dry_run_refuses_a_plan_that_does_not_fit(tiny_model, tmp_path):
    r = recipe(
        tmp_path,
        tiny_model("llama"),
        "{max_size_ratio: 0.8}",
        "  - {stage: distill, steps: 2, batch_size: 100000, seq_len: 4096}",
    )
    msg = assert_one_line_error(compress("run", r, "-o", tmp_path / "out", "--dry-run"), 2)
    assert "not enough memory" in msg


def test_resume_after_a_kill_in_distill_skips_the_finished_prune(tiny_model, tmp_path):
    r = recipe(
        tmp_path,
        tiny_model("llama"),
        "{max_size_ratio: 2.0}",
        "  - {stage: prune, method: wanda, samples: 4, seq_len: 32}\n"
        "  - {stage: distill, steps: 6, seq_len: 32, batch_size: 2, checkpoint_every: 2}\n"
        "  - {stage: quantize, scheme: w4a16, group_size: 32}",
    )
    killed = compress("run", r, "-o", tmp_path / "out", env={"COMPRESS_FAULT_KILL_AT_STEP": "4"})
    assert killed.returncode == -9 and not (tmp_path / "out").exists()
    partial = tmp_path / ".out.partial"
    assert (partial / "stages" / "0-prune" / "stage.json").is_file() and (partial / "checkpoints" / "step-4").is_dir()
    assert "--resume" in assert_one_line_error(compress("run", r, "-o", tmp_path / "out"), 2)
    changed = compress("run", r, "-o", tmp_path / "out", "--resume", "--set", "stages.1.lr=0.5")
    assert "recipe differs" in assert_one_line_error(changed, 2)

    proc = compress("run", r, "-o", tmp_path / "out", "--resume", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming after stage 0 (prune)" in proc.stderr and "prune: wanda" not in proc.stderr  # prune not redone
    rep = json.loads(proc.stdout)
    assert [s["stage"] for s in rep["stages"]] == ["prune", "distill", "quantize"]
    assert rep["stages"][1]["training"]["resumed_from"] == 4
    assert not partial.exists() and not (tmp_path / "out" / "stages").exists()
    assert rep["estimate"]["bytes_on_disk"] > 0 and rep["run_peak_rss_bytes"] > 0
