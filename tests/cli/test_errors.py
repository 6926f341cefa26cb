"""Bad input through the real command: one line on stderr, exit 2 (usage) or 1 (failure),
no traceback, input untouched, no partial output left behind."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


def compress(*args, env=None, cwd=None, fresh=False):
    """The command line's `main`, as the console script calls it: its exit code, stdout and
    stderr. In this process (a new one costs ~6 s of imports, most of the suite's CLI tests'
    time), unless it needs its own environment or `fresh` asks for a real process."""
    if env is not None or fresh:
        e = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
        return subprocess.run(
            [sys.executable, "-m", "compress", *map(str, args)],
            capture_output=True,
            text=True,
            env=e,
            cwd=cwd,
            timeout=300,
        )
    return in_process([str(a) for a in args], cwd)


def in_process(argv: list[str], cwd=None) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import signal
    import warnings

    import torch

    from compress import cli

    out, err, here, threads = io.StringIO(), io.StringIO(), os.getcwd(), torch.get_num_threads()
    sigterm = signal.getsignal(signal.SIGTERM)
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        # a fresh warnings registry: a warning shown by an earlier call is shown again, as in a new process
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.simplefilter("default")
            try:
                cli.main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
        signal.signal(signal.SIGTERM, sigterm)
    return subprocess.CompletedProcess(["compress", *argv], code, out.getvalue(), err.getvalue())


def assert_one_line_error(proc, code):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr
    assert sum(ln.startswith("error: ") for ln in lines) == 1
    return lines[-1]


def no_partials(parent: Path):
    return not any(".partial-" in p.name for p in parent.iterdir())


def test_missing_path(tmp_path):
    msg = assert_one_line_error(compress("quantize", tmp_path / "nope", "-o", tmp_path / "out", "--scheme", "w8a16"), 2)
    assert "not found" in msg


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("hello")
    msg = assert_one_line_error(compress("quantize", tmp_path / "m", "-o", tmp_path / "out"), 2)
    assert "config.json" in msg


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tiny_model, tmp_path, damage):
    src = tmp_path / "m"
    src.mkdir()
    for f in tiny_model("llama").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    before = weights.read_bytes()
    msg = assert_one_line_error(compress("quantize", src, "-o", tmp_path / "out", "--scheme", "w8a16"), 2)
    assert "safetensors" in msg or "truncated" in msg
    assert weights.read_bytes() == before and not (tmp_path / "out").exists() and no_partials(tmp_path)


def test_pickled_weights_need_a_flag(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"not really")
    msg = assert_one_line_error(compress("quantize", tmp_path / "m", "-o", tmp_path / "out"), 2)
    assert "--allow-pickle" in msg


def test_unknown_scheme(tiny_model, tmp_path):
    msg = assert_one_line_error(
        compress("quantize", tiny_model("llama"), "-o", tmp_path / "out", "--scheme", "w3a5"), 2
    )
    assert "scheme" in msg and "w4a16" in msg


@pytest.mark.parametrize("command", ["quantize", "eval", "bench"])
def test_unknown_device(tiny_model, tmp_path, command):
    args = ["-o", tmp_path / "out"] if command == "quantize" else []
    msg = assert_one_line_error(compress(command, tiny_model("llama"), *args, "--device", "tpu"), 2)
    assert "cpu" in msg and "cuda" in msg


@pytest.mark.parametrize("value,needle", [("100", "power of two"), ("big", "--group-size"), ("128", "sizes that fit")])
def test_invalid_group_size(tiny_model, tmp_path, value, needle):
    # the tiny llama's layers are 64 and 128 wide: 128 does not divide 64
    msg = assert_one_line_error(
        compress("quantize", tiny_model("llama"), "-o", tmp_path / "out", "--group-size", value), 2
    )
    assert needle in msg


def test_group_size_128_on_smollm2_names_the_layer(tmp_path):
    msg = assert_one_line_error(
        compress("quantize", "smollm2-135m", "-o", tmp_path / "out", "--scheme", "w4a16", "--group-size", "128"), 2
    )
    assert "model.layers.0.self_attn.q_proj" in msg and "576" in msg and "64" in msg


def test_existing_output_is_refused_then_overwritten(tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    msg = assert_one_line_error(
        compress("quantize", tiny_model("llama"), "-o", out, "--scheme", "w8a16", "--no-eval"), 2
    )
    assert "--overwrite" in msg and (out / "keep.txt").read_text() == "mine"
    ok = compress("quantize", tiny_model("llama"), "-o", out, "--scheme", "w8a16", "--no-eval", "--overwrite")
    assert ok.returncode == 0, ok.stderr
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists() and no_partials(tmp_path)


def test_unwritable_output(tiny_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = compress("quantize", tiny_model("llama"), "-o", blocker / "out", "--scheme", "w8a16", "--no-eval")
    assert_one_line_error(proc, proc.returncode if proc.returncode in (1, 2) else -1)


def test_output_inside_input_is_refused(tiny_model):
    src = tiny_model("llama")
    msg = assert_one_line_error(compress("quantize", src, "-o", src / "out", "--no-eval"), 2)
    assert "overlaps" in msg and not (src / "out").exists()


def test_hub_id_offline_fails_fast(tmp_path):
    proc = compress("quantize", "some-org/some-model", "-o", tmp_path / "out", env={"HF_HUB_OFFLINE": "1"})
    msg = assert_one_line_error(proc, 1)
    assert "hub" in msg


def test_missing_option_is_one_line(tmp_path):
    assert_one_line_error(compress("quantize", "smollm2-135m"), 2)


def test_interrupt_leaves_nothing(tiny_model, tmp_path):
    """SIGINT during work: exit 130, one line, no output and no partial directory."""
    import signal
    import time

    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "compress",
            "quantize",
            "smollm2-135m",
            "-o",
            str(tmp_path / "out"),
            "--group-size",
            "auto",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # a shell's background jobs start with SIGINT ignored, and Python then keeps it so
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    # wait until it is writing or measuring, then interrupt
    while time.time() < deadline and not any(".partial-" in p.name for p in tmp_path.iterdir()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert not (tmp_path / "out").exists() and no_partials(tmp_path)


def test_a_checkpoint_that_reloads_with_random_weights_is_not_measured(tiny_model, tmp_path):
    """A checkpoint missing a tensor loads in transformers (filled with random values): eval refuses to score it."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "m"
    src.mkdir()
    for f in tiny_model("llama").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    weights = load_file(src / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    msg = assert_one_line_error(compress("eval", src, "--eval-tokens", "256", "--no-latency"), 1)
    assert "reloads it with 1 weights missing (model.layers.1.mlp.down_proj.weight" in msg
