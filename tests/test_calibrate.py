"""The layer-by-layer runner's helpers."""

import torch

from compress.calibrate import SharedReaders


def test_linears_reading_the_same_tensor_share_an_owner():
    shared = SharedReaders()
    x, y = torch.ones(2, 4), torch.ones(2, 4)  # equal values, different tensors
    for _ in range(2):  # two batches
        shared.next_batch()
        assert [shared.reader(n, x) for n in ("q", "k", "v")] == ["q", "q", "q"]
        assert shared.reader("o", y) == "o"
        x, y = torch.ones(2, 4), torch.ones(2, 4)
    assert shared.groups(["q", "k", "v", "o", "never_run"]) == {
        "q": ["q", "k", "v"],
        "o": ["o"],
        "never_run": ["never_run"],
    }
