"""Distillation on SmolLM2-135M (teacher): heal a layer-dropped and a 2:4-pruned student.

    .venv/bin/python benchmarks/distill.py [--steps 80] [--steps-2of4 60] [--work DIR] [--no-write]

Rows (each student trained on the built-in training text, 1024 tokens per step, 2 CPU threads,
within a 10-minute training budget; scored on held-out text the training never reads):
  1. drop 10 of 30 layers (`compress prune --method structured --drop-layers 10`), distilled with
     the defaults: KL on logits + next-token loss
  2. the same student, KL on logits only
  3. the same student trained with the plain next-token loss only (same steps, same data)
  4. 2:4 SparseGPT student, distilled, KL on logits only (its zeros held fixed); all 30 layers,
     so fewer steps fit
"Gap closed" = (student ppl before - after) / (student ppl before - teacher ppl). Rewrites this
script's section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import write_section  # noqa: E402

ENV = {**os.environ, "TQDM_DISABLE": "1"}


def compress(*args: str) -> dict:
    cmd = [sys.executable, "-m", "compress", *args, "--no-latency", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout)


def distill(student: Path, out: Path, steps: int, extra: list[str]) -> dict:
    """A finished run in --work is read back, not redone (its report holds the same numbers)."""
    if (out / "report.json").is_file():
        rep = json.loads((out / "report.json").read_text())
        settings = rep["stages"][0]["settings"]
        asked = {"steps": steps, **{k[2:].replace("-", "_"): float(v) for k, v in zip(extra[::2], extra[1::2])}}
        if any(settings[k] != v for k, v in asked.items()):
            sys.exit(f"{out} was trained with other settings than {asked}; use another --work")
        print(f"reusing {out}")
    else:
        rep = compress(
            "distill",
            "--teacher",
            "smollm2-135m",
            "--student",
            str(student),
            "-o",
            str(out),
            "--steps",
            str(steps),
            *extra,
        )
    t = next(s["training"] for s in rep["stages"] if s["stage"] == "distill")
    gap = t["student_perplexity_before"] - t["teacher_perplexity"]
    closed = (t["student_perplexity_before"] - t["student_perplexity_after"]) / gap
    return {
        "teacher": t["teacher_perplexity"],
        "before": t["student_perplexity_before"],
        "after": t["student_perplexity_after"],
        "closed": closed,
        "seconds": t["seconds"],
        "tokens": t["tokens"],
        "tps": t["tokens_per_s"],
        "reloaded": rep["result"]["perplexity"]["value"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=80, help="steps for the layer-dropped student")
    ap.add_argument("--steps-2of4", type=int, default=60, help="steps for the 2:4 student (30 layers: slower steps)")
    ap.add_argument("--work", type=Path, help="working directory; finished runs in it are reused")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    tmp = args.work or Path(tempfile.mkdtemp(prefix="compress-bench-distill-"))
    print(f"working in {tmp}")
    for name, opts in (
        ("drop10", ["--method", "structured", "--drop-layers", "10"]),
        ("2of4", ["--method", "sparsegpt", "--pattern", "2:4"]),
    ):
        if not (tmp / name / "config.json").is_file():
            compress("prune", "smollm2-135m", "-o", str(tmp / name), *opts, "--no-eval")
    rows = [
        (
            "drop 10 of 30 layers: distilled, KL on logits + next-token (defaults)",
            args.steps,
            distill(tmp / "drop10", tmp / "drop10-kdlm", args.steps, ["--kd-weight", "1", "--lm-weight", "1"]),
        ),
        (
            "drop 10 of 30 layers: distilled, KL on logits only",
            args.steps,
            distill(tmp / "drop10", tmp / "drop10-kd", args.steps, ["--kd-weight", "1", "--lm-weight", "0"]),
        ),
        (
            "drop 10 of 30 layers: next-token loss only (no teacher)",
            args.steps,
            distill(tmp / "drop10", tmp / "drop10-lm", args.steps, ["--kd-weight", "0", "--lm-weight", "1"]),
        ),
        (
            "2:4 SparseGPT: distilled, KL on logits only",
            args.steps_2of4,
            distill(tmp / "2of4", tmp / "2of4-kd", args.steps_2of4, ["--kd-weight", "1", "--lm-weight", "0"]),
        ),
    ]
    lines = [
        "## Distillation (SmolLM2-135M teacher)",
        "",
        f"`.venv/bin/python benchmarks/distill.py --steps {args.steps} --steps-2of4 {args.steps_2of4}`: each student "
        f"trained for "
        "the steps shown, 4 sequences x 256 tokens per step, of the built-in training text (pydoc even pages, 182 "
        "windows: "
        "about 45 steps per epoch), AdamW lr 2e-4, "
        "5% warm-up + cosine, float32 on CPU (2 threads); the budget is 10 minutes of training per student. "
        "Held-out perplexity on 8192 tokens of the pydoc odd pages (windows of 512), measured in the training process; "
        "'reloaded' is the saved checkpoint reloaded by plain transformers.",
        "",
        "| student | steps | teacher ppl | before | after | gap closed | reloaded | training time | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, steps, r in rows:
        lines.append(
            f"| {name} | {steps} | {r['teacher']:.3f} | {r['before']:.3f} | {r['after']:.3f} | {r['closed']:.1%} | "
            f"{r['reloaded']:.3f} | "
            f"{r['seconds']:.0f} s | {r['tps']:.0f} |"
        )
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("distill", body)


if __name__ == "__main__":
    main()
