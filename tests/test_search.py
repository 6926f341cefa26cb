"""`compress search`: the grid pruned by what is measured, the smallest candidate meeting the
budget written as a normal checkpoint, nothing written when none meets it."""

import json

import pytest
from typer.testing import CliRunner

from compress import search
from compress.cli import app
from compress.recipe import Gates
from compress.report.schema import Candidate, Measurement, Perplexity, Speed
from tests.cli.test_errors import assert_one_line_error, compress


def cand(label, size, ppl, verdict="missed", **kw):
    m = Measurement(
        path=label,
        bytes_on_disk=size,
        bits_per_weight=None,
        perplexity=Perplexity(value=ppl, text="t", seq_len=16, tokens=64),
    )
    return Candidate(label=label, stages=[], estimated_bytes=size, estimated_seconds=1, verdict=verdict, result=m, **kw)


def test_front_and_winner():
    cs = [
        cand("a", 100, 20.0),
        cand("b", 200, 15.0, "met"),
        cand("c", 300, 16.0, "met"),  # larger and worse than b: off the front
        cand("d", 400, 14.0, "met"),
        Candidate(label="e", stages=[], estimated_bytes=50, estimated_seconds=1, verdict="skipped"),
    ]
    assert search.front(cs) == {0, 1, 3}
    assert search.winner(cs, "size") == 1
    marked = search.marked(cs, "size")
    assert [c.winner for c in marked] == [False, True, False, False, False]
    assert search.winner([cs[0], cs[4]], "size") is None


def test_decode_objective_counts_a_noisy_candidate_at_its_slowest_round_pair():
    def timed(label, decode, lo, hi, noisy):
        sp = Speed(prefill=1.0, prefill_range=[1, 1], decode=decode, decode_range=[lo, hi], rounds=5, noisy=noisy)
        return cand(label, 100, 10.0, "met", speed=sp)

    steady, lucky = timed("steady", 1.3, 1.25, 1.35, False), timed("lucky", 1.6, 0.9, 2.1, True)
    assert search.winner([lucky, steady], "decode") == 1
    assert search.winner([lucky, timed("slow", 0.8, 0.75, 0.85, False)], "decode") == 0


def test_skips_what_measurement_already_decided():
    met = search.Point("w4a16 g64 rtn", [], ("w4a16", 64, 0.0), bytes=100, record=cand("x", 100, 1.0, "met"))
    same_storage = search.Point("w4a16 g64 gptq", [], ("w4a16", 64, 0.0), bytes=100)
    larger = search.Point("w8a16 channel rtn", [], ("w8a16", "channel", 0.0), bytes=180)
    smaller = search.Point("w4a16 g128 gptq", [], ("w4a16", 128, 0.0), bytes=90)
    assert "same storage" in search._skip_reason(same_storage, [met], "size")
    assert "no smaller than #1" in search._skip_reason(larger, [met], "size")
    assert search._skip_reason(smaller, [met], "size") is None
    assert search._skip_reason(larger, [met], "decode") is None  # speed is not known before it is timed


def test_grid_takes_only_group_sizes_that_fit():
    spec = search.Spec(model="m", output=None, budget=Gates(max_ppl_increase=0.05), group_sizes=[128, 64, 32])
    labels = [p.label for p in search.grid(spec, (64, 128))]
    assert "w4a16 g128 rtn" not in labels and "w4a16 g64 gptq" in labels and "w8a16 channel awq" in labels
    assert len(labels) == 2 * 3 + 3


def test_search_writes_the_smallest_candidate_that_meets_the_budget(tiny_model, tmp_path):
    # On a random tiny llama, w4a16 with zero points (the default grid) has a mean KL of 4.7e-5 from the base, w8a16
    # per channel 4.4e-7. (Perplexity, near 50,000 on a random model, moves by a few thousandths of a percent either
    # way at 8 bits: too close to w4a16's +0.01% to separate them reliably.)
    out = tmp_path / "out"
    proc = compress(
        "search", tiny_model("llama"), "-o", out, "--max-kl-divergence", "1e-5",
        "--methods", "rtn", "--group-sizes", "64", "--eval-tokens", "2048", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    cands = found["candidates"]
    assert [c["label"] for c in cands] == ["w4a16 g64 rtn", "w8a16 channel rtn"]
    assert [c["verdict"] for c in cands] == ["missed", "met"]
    assert found["winner"] == "w8a16 channel rtn" and cands[1]["winner"] and cands[1]["front"]
    # the candidate smaller than the winner was measured and missed the budget
    win = cands[1]["result"]["bytes_on_disk"]
    assert cands[0]["result"]["bytes_on_disk"] < win and "max_kl_divergence" in cands[0]["reason"]
    report = json.loads((out / "report.json").read_text())
    assert report["stages"][0]["settings"]["scheme"] == "w8a16"
    assert [c["label"] for c in report["search"]] == [c["label"] for c in cands]
    assert report["result"]["bytes_on_disk"] == win
    assert report["result"]["path"] == report["recipe"]["output"] == str(out)
    assert "w4a16 g64 rtn" in (out / "report.html").read_text() and "## Search" in (out / "report.md").read_text()
    assert not (out / ".candidates").exists() and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_no_candidate_meets_the_budget(tiny_model, tmp_path):
    out = tmp_path / "out"
    proc = compress(
        "search", tiny_model("llama"), "-o", out, "--max-ppl-increase", "0.001%",
        "--schemes", "w4a16", "--methods", "rtn", "--group-sizes", "64", "--eval-tokens", "2048",
    )  # fmt: skip
    msg = assert_one_line_error(proc, 1)
    assert "no candidate met the budget" in msg and "nothing was written" in msg
    assert "w4a16 g64 rtn" in proc.stdout and "missed" in proc.stdout  # the table of what was tried
    assert list(tmp_path.iterdir()) == []


def test_dry_run_lists_candidates_and_writes_nothing(tiny_model, tmp_path):
    args = ["search", str(tiny_model("llama")), "-o", str(tmp_path / "o"), "--max-ppl-increase", "5%", "--dry-run"]
    result = CliRunner().invoke(app, [*args, "--sparsity", "0.5"])
    assert result.exit_code == 0, result.output
    assert "w4a16 g64 rtn" in result.output and "w8a16 channel gptq" in result.output
    assert "sparsegpt 50% sparse" in result.output and "w4a16 g128" not in result.output  # 128 divides no width
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, words",
    [
        ([], "quality budget"),
        (["--max-ppl-increase", "lots"], "5% or 0.05"),
        (["--max-ppl-increase", "5%", "--schemes", "w7a16"], "unknown scheme"),
        (["--max-ppl-increase", "5%", "--objective", "fastest"], "size or decode"),
        (["--max-ppl-increase", "5%", "--group-sizes", "x"], "comma-separated"),
        (["--max-task-drop", "1"], "needs --tasks"),
        (["--max-ppl-increase", "5%", "--objective", "decode", "--no-latency"], "drop --no-latency"),
        (["--min-embedding-similarity", "0.9"], "for encoders"),
    ],
)
def test_bad_search_options(tiny_model, tmp_path, args, words):
    from compress.errors import UsageError

    model = str(tiny_model("llama"))
    with pytest.raises(UsageError, match=words):
        app(["search", model, "-o", str(tmp_path / "o"), *args], standalone_mode=False)
    assert list(tmp_path.iterdir()) == []
