"""Nothing left behind and nothing printed raw: control characters from files are shown as
escapes, SIGTERM stops a run like Ctrl-C (no output, no worker, no temporary directory), and the
temporary directory of a killed run is named and removed by the next run."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil

from compress.errors import printable
from tests.cli.test_errors import assert_one_line_error, compress


def test_printable_shows_control_characters_as_escapes():
    assert printable("a\x1b[31mred\rb\x07\nc") == "a\\x1b[31mred\\rb\\x07\nc"
    assert printable("one\nline", newlines=False) == "one\\nline"
    assert printable("tabs\tand ünïcode stay") == "tabs\tand ünïcode stay"


def test_names_from_files_do_not_reach_the_terminal_raw(tmp_path):
    bad = tmp_path / "evil\x1b]0;pwned\x07name"
    bad.mkdir()
    proc = compress("quantize", bad, "-o", tmp_path / "o", "--no-eval")
    line = assert_one_line_error(proc, 2)
    assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr and "\\x1b" in line


def test_sigterm_leaves_nothing_behind(tiny_model, tmp_path):
    tmp, work = tmp_path / "tmp", tmp_path / "work"
    tmp.mkdir()
    work.mkdir()
    env = {**os.environ, "TQDM_DISABLE": "1", "TMPDIR": str(tmp)}  # the run's own temporary directories
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "compress",
            "quantize",
            str(tiny_model("llama")),
            "-o",
            str(work / "out"),
            "--scheme",
            "w8a16",
            "--eval-tokens",
            "4096",
            "--no-latency",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    kids, deadline = [], time.time() + 240  # the measuring server and the worker it forked
    while len(kids) < 2 and time.time() < deadline and proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            kids = psutil.Process(proc.pid).children(recursive=True)
            kids = [k for k in kids if "compress.eval" in " ".join(k.cmdline())]
        time.sleep(0.05)
    assert len(kids) == 2, "the measurement worker never started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "terminated" in err.splitlines()[-1]
    for k in kids:  # stopped with their caller, not orphaned
        with contextlib.suppress(psutil.NoSuchProcess):
            k.wait(timeout=30)
        assert not k.is_running()
    assert list(work.iterdir()) == [] and list(tmp.iterdir()) == []


def test_a_killed_runs_temporary_directory_is_named_and_removed(tiny_model, tmp_path):
    stale = tmp_path / ".out.partial-999999999-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_text("half")
    proc = compress("quantize", tiny_model("llama"), "-o", tmp_path / "out", "--scheme", "w8a16", "--no-eval")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"removed {stale}" in proc.stderr and "interrupted run" in proc.stderr and not stale.exists()
