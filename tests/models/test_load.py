"""Loading compress's own checkpoints back (models/load.py)."""

import torch

from compress.models.load import load
from compress.models.source import resolve


def test_quantized_checkpoint_loads_as_plain_tensors(quantized):
    """compressed-tensors (0.20 under transformers 5.17) left each de-quantized module's tensors in a CPU offload
    cache that `model.to(device)` did not move: on an H200, `compress bench --device cuda` then ran its fp8 kernels
    on CPU. Whatever the versions, the loaded model holds plain tensors, each where `load` was asked to put it."""
    loaded = load(resolve(str(quantized("llama", "fp8"))), dtype="float32", quantized=True)
    kinds = {type(m._parameters) for m in loaded.model.modules()} | {type(m._buffers) for m in loaded.model.modules()}
    assert kinds == {dict}
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    assert loaded.quantized and all(p.dtype == torch.float32 for p in loaded.model.parameters())
