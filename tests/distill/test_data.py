"""Which windows each step, micro-batch and process reads."""

import pytest
import torch

from compress.distill.data import Layout, TrainData, load, micro_batch
from compress.errors import UsageError

DATA = TrainData(torch.arange(40).reshape(20, 2), "20 windows")


def step_windows(layout: Layout, step: int) -> list[int]:
    got = []
    for micro in range(layout.grad_accum):
        for rank in range(layout.world):
            got += micro_batch(DATA, layout, seed=1, step=step, micro=micro, rank=rank)[:, 0].tolist()
    return sorted(got)


def test_processes_and_accumulation_read_the_same_windows_per_step():
    for step in range(12):  # crosses epochs
        one = step_windows(Layout(batch_size=2, grad_accum=2, world=1), step)
        two = step_windows(Layout(batch_size=2, grad_accum=1, world=2), step)
        assert one == two and len(one) == 4


def test_an_epoch_reads_every_window_once_in_a_seeded_order():
    layout = Layout(batch_size=4, grad_accum=1)
    epoch = [w for s in range(5) for w in micro_batch(DATA, layout, 3, s, 0)[:, 0].tolist()]
    assert sorted(epoch) == list(range(0, 40, 2)) and epoch != sorted(epoch)
    assert epoch == [w for s in range(5) for w in micro_batch(DATA, layout, 3, s, 0)[:, 0].tolist()]
    other = [w for s in range(5) for w in micro_batch(DATA, layout, 4, s, 0)[:, 0].tolist()]
    assert other != epoch


def test_text_shorter_than_one_step_is_refused(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words of text")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    with pytest.raises(UsageError, match="shorter than one sample of 64 tokens"):
        load(tok, str(tiny), "text", 64, Layout(4, 1))
    tiny.write_text("a few more words of text " * 30)  # 2 windows of 64 tokens: half a step of 4
    with pytest.raises(UsageError, match="fewer than one optimizer step"):
        load(tok, str(tiny), "text", 64, Layout(4, 1))
