"""Interleaved timing: the order of rounds, the paired ratio, and the noise flag that keeps a
busy machine's numbers out of a stated ratio."""

from __future__ import annotations

import pytest

from compress.eval import latency
from compress.recipe import Gates
from compress.report import gates, render
from compress.report.schema import Latency, Measurement, Report, Speed


def fake(name: str, calls: list[str], rates: list[tuple[float, float | None]]):
    it = iter(rates)

    def run():
        calls.append(name)
        return next(it)

    return run


def test_rounds_alternate_after_one_warm_up_each():
    calls: list[str] = []
    a = fake("a", calls, [(1.0, 1.0)] * 5)
    b = fake("b", calls, [(2.0, 2.0)] * 5)
    out = latency.interleaved([a, b], rounds=4)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert [len(r) for r in out] == [4, 4] and out[1][0] == (2.0, 2.0)


def test_ratio_is_the_median_of_adjacent_pairs():
    base = [(100.0, 10.0), (110.0, 11.0), (90.0, 9.0), (100.0, 10.0), (105.0, 10.5)]
    result = [(b * 2, d * 3) for b, d in base]  # a busy spell slows both alike
    sp = latency.compare(base, result)
    assert sp["prefill"] == pytest.approx(2.0) and sp["decode"] == pytest.approx(3.0)
    assert sp["prefill_range"] == pytest.approx([2.0, 2.0]) and not sp["noisy"] and sp["rounds"] == 5


def test_one_slow_round_of_one_model_is_flagged_not_a_ratio():
    base = [(100.0, 10.0)] * 5
    result = [(100.0, 10.0), (100.0, 10.0), (100.0, 1.0), (100.0, 10.0), (100.0, 10.0)]  # another process ran
    sp = latency.compare(base, result)
    assert sp["decode"] == pytest.approx(1.0)  # the median is robust to it
    assert sp["noisy"] and sp["decode_range"] == pytest.approx([0.1, 1.0])


def test_encoder_rounds_have_no_decode():
    sp = latency.compare([(100.0, None)] * 3, [(120.0, None)] * 3)
    assert sp["decode"] is None and sp["decode_range"] is None and sp["prefill"] == pytest.approx(1.2)


def report(speed: Speed) -> Report:
    lat = Latency(prefill_tokens_per_s=100, decode_tokens_per_s=10, prompt_len=8, new_tokens=4, kernel="k",
                  device="cpu", dtype="float32", rounds=speed.rounds)  # fmt: skip
    m = Measurement(path="x", bytes_on_disk=10, bits_per_weight=None, latency=lat)
    return Report(tool="t", created="c", model="m", task="causal-lm", recipe={}, stages=[], base=m, result=m,
                  environment={}, speed=speed)  # fmt: skip


def test_noisy_speed_is_shown_as_a_range_and_passes_a_gate_only_if_every_pair_does():
    noisy = Speed(prefill=1.5, prefill_range=[0.9, 2.0], decode=1.5, decode_range=[0.9, 2.0], rounds=5, noisy=True)
    rep = report(noisy)
    md = render.markdown(rep)
    assert "noisy: 0.90x to 2.00x" in md and "1.50x" not in md and "machine was busy" in md
    (g,) = gates.check(Gates(min_speedup=1.2), rep)
    assert not g.passed and "noisy" in g.shown
    (g,) = gates.check(Gates(min_speedup=0.8), rep)
    assert g.passed

    quiet = Speed(prefill=1.5, prefill_range=[1.4, 1.6], decode=1.5, decode_range=[1.4, 1.6], rounds=5, noisy=False)
    assert "1.50x (1.40-1.60)" in render.markdown(report(quiet))
    (g,) = gates.check(Gates(min_speedup=1.45), report(quiet))
    assert g.passed and g.value == pytest.approx(1.5)


def test_a_report_without_interleaved_timing_states_no_ratio():
    rep = report(Speed(prefill=1.0, prefill_range=[1, 1], decode=1.0, decode_range=[1, 1], rounds=3, noisy=False))
    rep = rep.model_copy(update={"speed": None})
    assert "not timed together" in render.markdown(rep)
    (g,) = gates.check(Gates(min_speedup=0.5), rep)
    assert not g.passed and g.shown == "not measured"
