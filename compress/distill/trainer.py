"""The training loop: AdamW, warm-up + cosine, accumulation, clipping, autocast, checkpoints.

It runs as one process or as many under `accelerate launch` / `torchrun` (data parallel,
gradients averaged by accelerate; FSDP or DeepSpeed come from accelerate's own config).
Every process reads its own windows (see `data.micro_batch`); only the main process writes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from transformers import get_cosine_schedule_with_warmup

from compress.distill import losses
from compress.distill.data import Layout, TrainData, micro_batch
from compress.errors import UsageError

# Fault injection for the resume tests: the main process kills itself after this step.
_FAULT_KILL_AT = int(os.environ.get("COMPRESS_FAULT_KILL_AT_STEP", "0"))


@dataclass(frozen=True)
class Options:
    steps: int
    layout: Layout
    lr: float = 2e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    loss: losses.LogitLoss = "kl"
    kd_weight: float = 1.0
    hidden_weight: float = 0.0
    hidden_loss: losses.HiddenLoss = "mse"
    lm_weight: float = 1.0  # measured better with the logit loss than either alone (benchmarks/RESULTS.md)
    checkpoint_every: int = 50
    seed: int = 0


@dataclass
class History:
    curve: list[dict] = field(default_factory=list)  # per optimizer step: step, loss, kd, hidden, lm, lr, seconds
    resumed_from: int = 0  # the step a resumed run started at (0: a fresh run)
    seconds: float = 0.0  # training time over all runs of this job
    tokens: int = 0  # tokens trained on (all processes)


def step_losses(
    student, teacher, ids: torch.Tensor, opts: Options, hidden_map: list[int] | None
) -> dict[str, torch.Tensor]:
    """The weighted losses for one micro-batch [B, L]; "loss" is their sum."""
    want_hidden = opts.hidden_weight > 0
    with torch.no_grad():
        t_out = teacher(ids, output_hidden_states=want_hidden)
    s_out = student(ids, output_hidden_states=want_hidden)
    # parts: each weighted loss, for the curve; loss: their differentiable sum
    parts: dict[str, torch.Tensor] = {}
    fused = losses.fused(opts.loss) and (opts.kd_weight > 0 or opts.lm_weight > 0)
    if fused:  # both logit losses in one chunked pass, gradient included; its parts carry none
        loss, kd, lm = losses.kl_and_next_token(
            s_out.logits, t_out.logits, ids, opts.kd_weight, opts.lm_weight, opts.temperature
        )
        parts = {k: v for k, v in (("kd", kd), ("lm", lm)) if getattr(opts, f"{k}_weight") > 0}
    else:
        if opts.kd_weight > 0:
            parts["kd"] = opts.kd_weight * losses.logit_loss(s_out.logits, t_out.logits, opts.temperature, opts.loss)
        if opts.lm_weight > 0:
            parts["lm"] = opts.lm_weight * losses.lm_loss(s_out.logits, ids)
        loss = sum(parts.values())
    if want_hidden:
        # hidden_states[0] is the embedding output; [i + 1] is layer i's output.
        pairs = [(s_out.hidden_states[i + 1], t_out.hidden_states[j + 1]) for i, j in enumerate(hidden_map or [])]
        parts["hidden"] = (
            opts.hidden_weight * sum(losses.hidden_loss(s, t, opts.hidden_loss) for s, t in pairs) / len(pairs)
        )
        loss = loss + parts["hidden"]
    parts["loss"] = loss
    return parts


def train(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    data: TrainData,
    opts: Options,
    accelerator,
    ckpt_dir: Path | None,
    resume: bool = False,
    hidden_map: list[int] | None = None,
    after_step: Callable[[], None] = lambda: None,
    on_step: Callable[[dict], None] = lambda row: None,
    stop_after: int | None = None,
) -> History:
    """Train `student` in place. after_step: re-applies constraints (masks) after each
    optimizer step. stop_after: end after this step, as a kill would (tests)."""
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    # Stepped once per optimizer step, not prepared by accelerate (which would step it once
    # per process).
    scheduler = get_cosine_schedule_with_warmup(optimizer, opts.warmup_steps, opts.steps)
    model, optimizer = accelerator.prepare(student, optimizer)
    teacher.to(accelerator.device).eval()
    history, start = History(), 0
    if resume and ckpt_dir is not None and (found := latest(ckpt_dir)) is not None:
        history, start = _load(found, accelerator.unwrap_model(model), optimizer, scheduler, opts)
    history.resumed_from = start

    layout, rank, world = opts.layout, accelerator.process_index, accelerator.num_processes
    if world != layout.world:
        raise UsageError(f"the plan is for {layout.world} processes, {world} are running")
    model.train()
    began = time.perf_counter()
    for step in range(start, opts.steps):
        t0 = time.perf_counter()
        totals: dict[str, float] = {}
        for micro in range(layout.grad_accum):
            ids = micro_batch(data, layout, opts.seed, step, micro, rank).to(accelerator.device)  # [B, L]
            last = micro == layout.grad_accum - 1
            with accelerator.no_sync(model) if not last else nullcontext(), accelerator.autocast():
                parts = step_losses(model, teacher, ids, opts, hidden_map)
                accelerator.backward(parts["loss"] / layout.grad_accum)
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / layout.grad_accum
        if opts.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), opts.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        after_step()
        totals = {k: _mean_over_processes(accelerator, v) for k, v in totals.items()}
        row = {
            "step": step + 1,
            **{k: round(v, 6) for k, v in totals.items()},
            "lr": lr,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        history.curve.append(row)
        history.tokens += layout.per_step * data.windows.shape[1]
        on_step(row)
        done = step + 1
        if ckpt_dir is not None and (done % opts.checkpoint_every == 0 or done == stop_after) and done < opts.steps:
            history.seconds += time.perf_counter() - began
            began = time.perf_counter()
            _save(ckpt_dir, done, accelerator, model, optimizer, scheduler, history, opts)
        if done == stop_after:
            break
        if done == _FAULT_KILL_AT and accelerator.is_main_process:  # tests: a kill right after a checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
    history.seconds += time.perf_counter() - began
    model.eval()
    return history


def _mean_over_processes(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([value], device=accelerator.device)
    return float(accelerator.reduce(t, reduction="mean"))


# --- checkpoints: OUT's staging directory/checkpoints/step-N, the newest kept -------------


def latest(ckpt_dir: Path) -> Path | None:
    done = sorted((p for p in ckpt_dir.glob("step-*") if (p / "state.json").is_file()), key=lambda p: int(p.name[5:]))
    return done[-1] if done else None


def _save(ckpt_dir: Path, step: int, accelerator, model, optimizer, scheduler, history: History, opts: Options) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = ckpt_dir / f".step-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(accelerator.unwrap_model(model), str(tmp / "student.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}, tmp / "scheduler.pt")
        state = {
            "step": step,
            "per_step": opts.layout.per_step,
            "seed": opts.seed,
            "steps": opts.steps,
            "history": asdict(history),
        }
        (tmp / "state.json").write_text(json.dumps(state))  # written last: its presence marks a whole checkpoint
        tmp.rename(ckpt_dir / f"step-{step}")
        for old in ckpt_dir.glob("step-*"):
            if old.name != f"step-{step}":
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load(path: Path, model, optimizer, scheduler, opts: Options) -> tuple[History, int]:
    state = json.loads((path / "state.json").read_text())
    if (state["per_step"], state["seed"], state["steps"]) != (opts.layout.per_step, opts.seed, opts.steps):
        raise UsageError(
            f"cannot resume from {path}: it was trained with {state['per_step']} windows per step, seed "
            f"{state['seed']}, "
            f"{state['steps']} steps; this run asks {opts.layout.per_step}, {opts.seed}, {opts.steps}"
        )
    try:
        load_model(model, str(path / "student.safetensors"))
    except RuntimeError as exc:
        raise UsageError(
            f"cannot resume from {path}: its weights do not fit this student ({str(exc).splitlines()[0][:200]})"
        ) from None
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    extra = torch.load(path / "scheduler.pt", weights_only=True)
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"])
    h = state["history"]
    return History(curve=h["curve"], seconds=h["seconds"], tokens=h["tokens"]), state["step"]
