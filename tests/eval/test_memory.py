"""A measuring process reports its own peak memory, not its parent's."""

import subprocess
import sys

from compress.eval.memory import peak_rss

MB = 2**20


def test_child_peak_excludes_the_parents():
    ballast = bytearray(400 * MB)  # the parent's peak: >= 400 MiB, touched
    ballast[::4096] = b"x" * len(ballast[::4096])
    assert peak_rss() >= 400 * MB
    child = subprocess.run(
        [sys.executable, "-c", "from compress.eval.memory import peak_rss; print(peak_rss())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(child.stdout) < 200 * MB  # a fork + exec'd ru_maxrss would include the parent's 400 MiB
    del ballast


def test_forked_measurement_excludes_the_callers_memory(tiny_model):
    """The measuring process is forked from a server started before the caller grew, so the
    caller's memory is not in its peak; the server's children start clean each time."""
    from compress.data.text import Texts
    from compress.eval.measure import measure
    from compress.recipe import EvalSpec

    texts = Texts(["The quick brown fox jumps over the lazy dog. " * 40] * 2, "test sentences")
    spec = EvalSpec(max_tokens=128, seq_len=64, latency=False)
    ballast = bytearray(1500 * MB)
    ballast[::4096] = b"x" * len(ballast[::4096])
    peaks = [measure(tiny_model("llama"), "causal-lm", spec, texts, []).measurement.peak_rss_bytes for _ in range(2)]
    assert all(p < 1000 * MB for p in peaks) and abs(peaks[0] - peaks[1]) < 50 * MB
    del ballast
