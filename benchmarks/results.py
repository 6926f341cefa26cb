"""benchmarks/RESULTS.md is made of sections, each rewritten by the script that names it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"


def cli(*args: str) -> dict:
    """`python -m compress ARGS --no-latency --json`, its report; stops the script with the command's last error
    line. Latency is left out: these scripts time nothing through the report."""
    cmd = [sys.executable, "-m", "compress", *args, "--no-latency", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout)


def measured_at() -> str:
    """The commit the measured code is at (and whether the tree had changes), for the record."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=RESULTS.parent.parent, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "Measured outside a git checkout."
    dirty = git(
        "status", "--porcelain", "--untracked-files=no", "--", "compress", "benchmarks", ":!benchmarks/RESULTS.md"
    )
    return f"Measured at commit {commit}{' with uncommitted changes' if dirty else ''}."


def write_section(name: str, body: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n{body}\n\n{measured_at()}\n{end}"
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else "# Benchmark results\n\nEach section is rewritten by the script it names and ends with the commit its "
        "code was at.\n"
    )
    if begin in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")
