"""`optimum-cli compress ...` (extra compress[optimum]) runs the same command as `compress ...`."""

import subprocess
import sys
from pathlib import Path

from tests.cli.test_errors import assert_one_line_error

OPTIMUM_CLI = Path(sys.executable).parent / "optimum-cli"


def optimum(*args):
    return subprocess.run([str(OPTIMUM_CLI), "compress", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_optimum_cli_quantizes_like_compress(tiny_model, tmp_path):
    proc = optimum("quantize", tiny_model("llama"), "-o", tmp_path / "out", "--scheme", "w8a16", "--no-eval")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "report.html").is_file()
    missing = optimum("quantize", tmp_path / "missing", "-o", tmp_path / "o2", "--scheme", "w8a16")
    msg = assert_one_line_error(missing, 2)
    assert "model not found" in msg
