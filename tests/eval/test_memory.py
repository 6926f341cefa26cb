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
