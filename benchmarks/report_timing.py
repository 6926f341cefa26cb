"""Can a busy machine fool the report's speed ratio? Identical weights timed against each other.

SmolLM2-135M's bf16 checkpoint against itself (`compress eval M --baseline M`): every true ratio
is 1.00x. Three conditions, all in one run of this script:
  quiet        nothing else running;
  busy         CPU hogs (one busy process per core) running the whole time;
  onset        the hogs start partway: during the interleaved rounds (at 0.6x the quiet run's time),
               and, for the old protocol, while the second model is timed, which it cannot survive.
For each: the report's protocol (both models in one process, rounds interleaved) and the old
one (two processes, one after the other, no interleaving), side by side.

usage: python benchmarks/report_timing.py [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import statistics
import threading
import time

from results import write_section

from compress.data import text as textdata
from compress.eval.latency import NOISY_SPREAD
from compress.eval.measure import measure
from compress.models import load as loading, source as sources
from compress.recipe import EvalSpec


def hog(stop) -> None:
    x = 1.0
    while not stop.is_set():
        for _ in range(100_000):
            x = x * 1.0000001 + 1e-9


class Hogs:
    """One busy process per core, started `delay` seconds after entering."""

    def __init__(self, n: int, delay: float = 0.0):
        self.n, self.delay, self.stop, self.procs = n, delay, mp.get_context("spawn").Event(), []

    def _start(self) -> None:
        # spawned, not forked: a fork made while a measuring worker runs would inherit the pipes the
        # parent reads that worker's output from, and the parent would wait for their end forever
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=hog, args=(self.stop,), daemon=True) for _ in range(self.n)]
        for p in self.procs:
            p.start()

    def __enter__(self):
        self.timer = threading.Timer(self.delay, self._start)
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.stop.set()
        for p in self.procs:
            p.join()


def fmt_speed(sp) -> str:
    lo, hi = sp.decode_range
    flag = " **noisy** (no ratio stated)" if sp.noisy else ""
    return f"{sp.decode:.2f}x (rounds {lo:.2f}-{hi:.2f}){flag}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    path = loading.checkpoint_dir(sources.resolve("smollm2-135m"), "auto")
    texts = textdata.load("builtin", "evaluation", "text")
    spec = EvalSpec(max_tokens=512, seq_len=512, new_tokens=args.new_tokens, reuse_base=False)
    cores = os.cpu_count() or 1
    rows, quiet_s = [], 0.0
    for cond in ("quiet", "busy", "onset"):
        t0 = time.time()
        hogs = {"quiet": None, "busy": Hogs(cores), "onset": Hogs(cores, delay=0.6 * quiet_s)}[cond]
        if hogs is None:
            inter = measure(path, "causal-lm", spec, texts, [], timed_with=path).speed
            quiet_s = time.time() - t0
        else:
            with hogs:
                inter = measure(path, "causal-lm", spec, texts, [], timed_with=path).speed
        # the old protocol: each model timed alone in its own process, one after the other
        with Hogs(cores) if cond == "busy" else contextlib.nullcontext():
            first = measure(path, "causal-lm", spec, texts, [])
        with Hogs(cores) if cond != "quiet" else contextlib.nullcontext():
            second = measure(path, "causal-lm", spec, texts, [])
        old = second.measurement.latency.decode_tokens_per_s / first.measurement.latency.decode_tokens_per_s
        rows.append((cond, fmt_speed(inter), f"{old:.2f}x", time.time() - t0))
    lines = [
        f"SmolLM2-135M bf16 checkpoint against itself (true ratio 1.00x): decode tokens/s at batch 1, prompt "
        f"{spec.prompt_len}, {spec.new_tokens} new tokens, torch dense bf16 matmul, cpu, {cores} cores; "
        f"{spec.latency_rounds} rounds per model; noisy when the ratios of adjacent rounds spread wider than "
        f"{NOISY_SPREAD}x. Busy: one CPU-bound process per core.",
        "",
        "| condition | report: one process, rounds interleaved | old: two processes, one after the other |",
        "|---|---|---|",
        *[f"| {cond} | {inter} | {old} |" for cond, inter, old, _ in rows],
        "",
        f"(total {statistics.fsum(r[3] for r in rows):.0f} s; `python benchmarks/report_timing.py "
        f"--new-tokens {spec.new_tokens}`)",
    ]
    print("\n".join(lines))
    write_section("report-timing", "## Timing a busy machine (`benchmarks/report_timing.py`)\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
