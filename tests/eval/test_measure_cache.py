"""An untimed base measurement is read back when nothing it depends on changed, and measured
again when anything did (weights, settings); never for a timed measurement."""

from __future__ import annotations

import os

import pytest

from compress.data.text import Texts
from compress.eval import measure as measuring
from compress.recipe import EvalSpec

TEXTS = Texts(["The quick brown fox jumps over the lazy dog. " * 40] * 4, "test sentences")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "measurements"


def no_worker(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(measuring, "run_worker", refuse)


def test_second_base_measurement_is_read_back(tiny_model, cache, monkeypatch):
    path, spec = tiny_model("llama"), EvalSpec(max_tokens=256, seq_len=64, latency=False)
    first = measuring.measure(path, "causal-lm", spec, TEXTS, [], reuse=True).measurement
    assert first.reused_from is None and len(list(cache.glob("*.json"))) == 1
    with monkeypatch.context() as m:
        no_worker(m)
        again = measuring.measure(path, "causal-lm", spec, TEXTS, [], reuse=True).measurement
    assert again.reused_from and again.perplexity == first.perplexity and again.peak_rss_bytes == first.peak_rss_bytes

    other = spec.model_copy(update={"max_tokens": 128})  # another setting: measured again
    assert measuring.measure(path, "causal-lm", other, TEXTS, [], reuse=True).measurement.reused_from is None
    weights = path / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # weights touched
    assert measuring.measure(path, "causal-lm", spec, TEXTS, [], reuse=True).measurement.reused_from is None


def test_timed_or_unasked_measurements_are_not_cached(tiny_model, cache):
    path = tiny_model("qwen2")
    measuring.measure(path, "causal-lm", EvalSpec(max_tokens=128, seq_len=64, latency=False), TEXTS, [])
    assert not cache.exists() or not list(cache.glob("*.json"))


def test_an_encoders_embeddings_come_back_with_it(tiny_model, cache, tmp_path, monkeypatch):
    path, spec = tiny_model("bert"), EvalSpec(max_texts=4, latency=False)
    kept = tmp_path / "base.pt"
    measuring.measure(path, "encoder", spec, TEXTS, [], keep_embeddings=kept, reuse=True)
    first = kept.read_bytes()
    kept.unlink()
    with monkeypatch.context() as m:
        no_worker(m)
        measuring.measure(path, "encoder", spec, TEXTS, [], keep_embeddings=kept, reuse=True)
    assert kept.read_bytes() == first
