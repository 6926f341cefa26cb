"""What one distillation step costs, by compute dtype and loss path, measured together.

    .venv/bin/python benchmarks/distill_speed.py [--student DIR] [--rounds 3] [--steps 3] [--threads N] [--no-write]

Teacher SmolLM2-135M, student the same with 10 of 30 layers dropped (`compress prune --method structured
--drop-layers 10`, made here when --student is not given), 4 windows x 256 tokens of the built-in training text per
step, AdamW, frozen embeddings: the `compress distill` defaults. Four ways to take the same step, in interleaved
rounds (each round times every way on the same windows), float32 master weights throughout:
  - float32, autograd losses: KL on logits + next-token cross-entropy through autograd (the path before the fused
    loss; `losses.logit_loss` + `losses.lm_loss`, still what `--loss reverse-kl|jsd` runs)
  - float32, fused losses: `losses.kl_and_next_token`, the gradient formed in closed form chunk by chunk
  - bfloat16 autocast, autograd losses
  - bfloat16 autocast, fused losses (`compress distill`'s default where bfloat16 multiplies faster)
Prints seconds a step (median over rounds, min-max), tokens a second and the speed-up over the first way.
Rewrites this script's section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results import cli, write_section  # noqa: E402

from compress.data import calibration  # noqa: E402
from compress.distill import losses  # noqa: E402
from compress.models import load as loading  # noqa: E402
from compress.models.source import resolve  # noqa: E402

WAYS = [("float32", "autograd"), ("float32", "fused"), ("bfloat16", "autograd"), ("bfloat16", "fused")]


def step(student, teacher, optimizer, ids: torch.Tensor, dtype: str, path: str) -> None:
    """One optimizer step of the default losses (KL weight 1 + next-token weight 1, temperature 1)."""
    with torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext():
        with torch.no_grad():
            t_logits = teacher(ids).logits
        s_logits = student(ids).logits
        if path == "fused":
            loss = losses.kl_and_next_token(s_logits, t_logits, ids, 1.0, 1.0)[0]
        else:
            loss = losses.logit_loss(s_logits, t_logits) + losses.lm_loss(s_logits, ids)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", type=Path, help="a layer-dropped SmolLM2 (default: made here)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per way and round")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    student_dir = args.student
    if student_dir is None:
        student_dir = Path(tmp.name) / "student"
        drop = ["--method", "structured", "--drop-layers", "10", "--no-eval"]
        cli("prune", "smollm2-135m", "-o", str(student_dir), *drop)
    teacher = loading.load(resolve("smollm2-135m"), "float32", "cpu").model.eval()
    loaded = loading.load(resolve(str(student_dir)), "float32", "cpu")
    windows, _, _ = calibration.windows("builtin", "text", loaded.tokenizer, 256, 4 * (args.steps + 1), None)
    # every way trains its own copy of the student from the same start, so none runs on another's updated weights
    students, optimizers = {}, {}
    for way in WAYS:
        m = copy.deepcopy(loaded.model).float().train()
        m.get_input_embeddings().requires_grad_(False)
        students[way] = m
        optimizers[way] = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4)
    for way in WAYS:  # warm-up: one untimed step each (allocator, oneDNN kernels)
        step(students[way], teacher, optimizers[way], windows[:4], *way)
    per_step: dict[tuple[str, str], list[float]] = {w: [] for w in WAYS}
    for r in range(args.rounds):
        for way in WAYS:
            t0 = time.perf_counter()
            for s in range(1, args.steps + 1):
                step(students[way], teacher, optimizers[way], windows[4 * s : 4 * s + 4], *way)
            per_step[way].append((time.perf_counter() - t0) / args.steps)
            print(f"round {r + 1}: {way[0]}, {way[1]} losses: {per_step[way][-1]:.2f} s a step", flush=True)
    base = statistics.median(per_step[WAYS[0]])
    rows = [
        "| compute | losses | s a step (median, min-max) | tokens/s | speed-up |",
        "|---|---|---|---|---|",
    ]
    for way in WAYS:
        med = statistics.median(per_step[way])
        rows.append(
            f"| {way[0]} | {way[1]} | {med:.2f} ({min(per_step[way]):.2f}-{max(per_step[way]):.2f}) | "
            f"{1024 / med:.0f} | {base / med:.2f}x |"
        )
    table = "\n".join(rows)
    print(table)
    if args.no_write:
        return
    cpu = platform.processor() or platform.machine()
    body = (
        "## One distillation step, by compute dtype and loss path (`benchmarks/distill_speed.py`)\n\n"
        f"`.venv/bin/python benchmarks/distill_speed.py --rounds {args.rounds} --steps {args.steps}`: teacher "
        "SmolLM2-135M, student the same with 10 of 30 layers dropped, 4 windows x 256 tokens of the built-in "
        f"training text a step, AdamW, embeddings frozen (the `compress distill` defaults); {args.threads} CPU "
        f"threads ({cpu}), {args.rounds} interleaved rounds of {args.steps} steps per way, float32 master weights.\n\n"
        f"{table}"
    )
    write_section("distill_speed", body)


if __name__ == "__main__":
    main()
