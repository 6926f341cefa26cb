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


def test_quantized_experts_load_under_the_models_own_names(quantized):
    """Mixtral's experts are `block_sparse_moe.experts.N.w1` on disk and `mlp.experts.N.w1` in transformers 5: the
    grids read from the file are renamed to the modules they belong to, each holding its stored values exactly."""
    from compress.formats.stored import read

    ckpt = quantized("mixtral", "w4a16", group_size=32)
    loaded = load(resolve(str(ckpt)), dtype="float32", quantized=True)
    modules = dict(loaded.model.named_modules())
    grids = loaded.quantized.grids
    assert any(".mlp.experts.0.w1" in n for n in grids) and all(n in modules for n in grids)
    stored = read(ckpt)
    on_disk = "model.layers.0.block_sparse_moe.experts.1.w2"
    assert on_disk in stored
    got = modules["model.layers.0.mlp.experts.1.w2"].weight
    assert torch.equal(got, stored[on_disk].dequantized())
