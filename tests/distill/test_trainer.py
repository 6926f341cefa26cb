"""The training loop: it learns, a resumed run equals a straight one, 2 processes equal 1."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compress.distill import trainer
from compress.distill.data import Layout, TrainData

STEPS = 6


@pytest.fixture(scope="module")
def pair(tiny_model):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32)
    torch.manual_seed(1)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():  # a different model with the same shapes and vocabulary
        p.data.add_(0.05 * torch.randn_like(p))
    return teacher.eval(), student


def _data(windows: int = 24) -> TrainData:
    gen = torch.Generator().manual_seed(0)
    return TrainData(torch.randint(0, 1000, (windows, 32), generator=gen), "random ids")


def _train(pair, ckpt_dir: Path | None, resume=False, stop_after=None, hidden=False, windows=24):
    from accelerate import Accelerator

    teacher, student0 = pair
    student = copy.deepcopy(student0)
    opts = trainer.Options(
        steps=STEPS,
        layout=Layout(2, 2),
        lr=1e-3,
        warmup_steps=1,
        checkpoint_every=2,
        hidden_weight=0.5 if hidden else 0.0,
        lm_weight=0.1,
    )
    hist = trainer.train(
        student,
        teacher,
        _data(windows),
        opts,
        Accelerator(cpu=True),
        ckpt_dir,
        resume,
        hidden_map=[0, 1] if hidden else None,
        stop_after=stop_after,
    )
    return student, hist


def test_loss_falls(pair):
    _, hist = _train(pair, None, hidden=True, windows=4)  # every step reads the same 4 windows
    first, last = hist.curve[0], hist.curve[-1]
    assert set(first) >= {"kd", "hidden", "lm", "loss", "lr"} and len(hist.curve) == STEPS
    assert last["loss"] < first["loss"]


def test_resume_equals_a_straight_run(pair, tmp_path):
    straight, _ = _train(pair, tmp_path / "a")
    _, half = _train(pair, tmp_path / "b", stop_after=STEPS // 2)  # as if killed after the checkpoint at step 3
    assert len(half.curve) == STEPS // 2 and trainer.latest(tmp_path / "b").name == f"step-{STEPS // 2}"
    resumed, hist = _train(pair, tmp_path / "b", resume=True)
    assert hist.resumed_from == STEPS // 2 and [r["step"] for r in hist.curve] == list(range(1, STEPS + 1))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_resume_refuses_another_plan(pair, tmp_path):
    from compress.errors import UsageError

    _train(pair, tmp_path, stop_after=2)
    teacher, student = pair
    from accelerate import Accelerator

    opts = trainer.Options(steps=STEPS, layout=Layout(2, 1), checkpoint_every=2)  # half the windows per step
    with pytest.raises(UsageError, match="cannot resume"):
        trainer.train(copy.deepcopy(student), teacher, _data(), opts, Accelerator(cpu=True), tmp_path, resume=True)


def _distill_cli(teacher: Path, student: Path, out: Path, extra: list[str], launcher: list[str]) -> None:
    cmd = [
        *launcher,
        "distill",
        "--teacher",
        str(teacher),
        "--student",
        str(student),
        "-o",
        str(out),
        "--steps",
        "3",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--dtype",
        "float32",
        "--no-eval",
        "--lr",
        "1e-3",
        *extra,
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_train_the_same_model_as_one_with_twice_the_accumulation(tiny_model, tmp_path):
    """torchrun, 2 CPU processes (gloo): batch 2 each, vs 1 process with batch 2 x 2 accumulation."""
    teacher, student = tiny_model("llama"), tiny_model("qwen2")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "compress",
    ]
    _distill_cli(teacher, student, tmp_path / "two", [], torchrun)
    _distill_cli(teacher, student, tmp_path / "one", ["--grad-accum", "2"], [sys.executable, "-m", "compress"])
    two, one = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    start = load_file(student / "model.safetensors")
    assert two.keys() == one.keys()
    moved = max(float((one[k].float() - start[k].float()).abs().max()) for k in one)
    assert moved > 1e-4  # training changed the weights
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=2e-5, msg=k)


@pytest.mark.parametrize("hidden", [False, True])
def test_step_losses_fused_pass_gives_the_autograd_gradients(pair, hidden):
    """The default logit loss (KL) takes the one-pass loss; its parts, its sum (with hidden-state matching added)
    and the student's gradients equal the autograd losses'."""
    from compress.distill import losses

    teacher, student0 = pair
    ids = _data(2).windows
    opts = trainer.Options(steps=1, layout=Layout(2, 1), kd_weight=0.7, lm_weight=0.3, hidden_weight=0.5 * hidden)
    fused, ref = copy.deepcopy(student0), copy.deepcopy(student0)
    parts = trainer.step_losses(fused, teacher, ids, opts, [0, 1] if hidden else None)
    parts["loss"].backward()
    with torch.no_grad():
        t_out = teacher(ids, output_hidden_states=True)
    s_out = ref(ids, output_hidden_states=True)
    kd = 0.7 * losses.logit_loss(s_out.logits, t_out.logits)
    lm = 0.3 * losses.lm_loss(s_out.logits, ids)
    total = kd + lm
    if hidden:
        pairs = zip(s_out.hidden_states[1:], t_out.hidden_states[1:])
        total = total + 0.5 * sum(losses.hidden_loss(s, t) for s, t in pairs) / 2
    total.backward()
    assert parts["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert parts["lm"].item() == pytest.approx(lm.item(), rel=1e-5)
    assert parts["loss"].item() == pytest.approx(total.item(), rel=1e-5)
    for (name, a), b in zip(fused.named_parameters(), ref.parameters()):
        if b.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-7), name
