"""The recipe prune(2:4) -> distill -> quantize(w4a16) on SmolLM2-135M, end to end with gates,
killed during the distill stage and resumed; the dry run's estimates against the measurement.

    .venv/bin/python benchmarks/recipes.py [--recipe recipes/2of4-distill-int4.yaml] [--kill-at 50] [--no-write]

Rewrites this script's section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import write_section  # noqa: E402

HERE = Path(__file__).parent
MB = 2**20


def compress(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "compress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=str(HERE.parent / "recipes" / "2of4-distill-int4.yaml"))
    ap.add_argument(
        "--kill-at",
        type=int,
        default=50,
        help="distill step after which the first run kills itself (50: right after a checkpoint)",
    )
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="compress-bench-recipe-")) / "out"

    plan = json.loads(compress("run", args.recipe, "-o", str(out), "--dry-run", "--json").stdout)
    t0 = time.perf_counter()
    killed = compress("run", args.recipe, "-o", str(out), env={"COMPRESS_FAULT_KILL_AT_STEP": str(args.kill_at)})
    first = time.perf_counter() - t0
    assert killed.returncode == -9, killed.stderr[-1500:]
    t0 = time.perf_counter()
    resumed = compress("run", args.recipe, "-o", str(out), "--resume", "--json")
    second = time.perf_counter() - t0
    if resumed.returncode not in (0, 1):
        sys.exit(f"resume failed: {resumed.stderr.strip().splitlines()[-1]}")
    rep = json.loads(resumed.stdout)
    redone_prune = "prune: sparsegpt" in resumed.stderr
    t = next(s["training"] for s in rep["stages"] if s["stage"] == "distill")
    base, res = rep["base"], rep["result"]
    est_peak, real_peak = plan["peak_bytes"], rep["run_peak_rss_bytes"]
    est_size, real_size = plan["output_bytes"], res["bytes_on_disk"]

    lines = [
        "## Recipe with gates, killed and resumed (`benchmarks/recipes.py`)",
        "",
        f"`compress run {Path(args.recipe).relative_to(HERE.parent)}` on SmolLM2-135M (2 CPU threads): the first run "
        f"killed itself "
        f"(SIGKILL) after distill step {args.kill_at} ({first:.0f} s), `--resume` finished it ({second:.0f} s) "
        f"{'REDOING' if redone_prune else 'without redoing'} the prune stage; distill resumed at step "
        f"{t['resumed_from']}.",
        "",
        "| | base | result |",
        "|---|---|---|",
        f"| perplexity | {base['perplexity']['value']:.3f} | {res['perplexity']['value']:.3f} |",
        f"| weights on disk | {base['bytes_on_disk'] / MB:.1f} MiB | {res['bytes_on_disk'] / MB:.1f} MiB |",
        f"| student during distill (before -> after) | | {t['student_perplexity_before']:.3f} -> "
        f"{t['student_perplexity_after']:.3f} |",
        "",
        "| gate | measured (limit) | result |",
        "|---|---|---|",
        *[f"| {g['name']} | {g['shown']} | {'pass' if g['passed'] else 'FAIL'} |" for g in rep["gates"]],
        "",
        f"Exit code {resumed.returncode}.",
        "",
        "`--dry-run` estimate against the run's measurement (peak: resident memory of the resumed run's process, whose "
        "largest stage is distill; output: bytes of the weight files):",
        "",
        "| | estimate | measured | error |",
        "|---|---|---|---|",
        f"| peak memory | {est_peak / MB:,.0f} MiB | {real_peak / MB:,.0f} MiB | {est_peak / real_peak - 1:+.1%} |",
        f"| output weights | {est_size / MB:,.1f} MiB | {real_size / MB:,.1f} MiB | {est_size / real_size - 1:+.1%} |",
        "",
        f"Time: the plan estimated {sum(s['seconds'] for s in plan['stages']):,.0f} s of stages; not compared here, as "
        f"the "
        "time of these runs depends on what else the machine did meanwhile.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("recipes", body)


if __name__ == "__main__":
    main()
