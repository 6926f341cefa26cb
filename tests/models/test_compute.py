"""Compute dtype apart from the stored dtype: float32 on CPUs with slow 16-bit matmuls, the
checkpoint still written in its own dtype."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console
from safetensors import safe_open

from compress import api
from compress.errors import UsageError
from compress.models import compute
from compress.recipe import validate


@pytest.fixture
def slow_half(monkeypatch):
    monkeypatch.setattr(compute, "half_is_slow", lambda dtype: True)
    monkeypatch.delenv(compute.OVERRIDE, raising=False)


def test_compute_dtype_policy(slow_half, monkeypatch):
    assert compute.compute_dtype(torch.bfloat16, "cpu", 10**6) == torch.float32
    assert compute.compute_dtype(torch.float16, "cpu", 10**6) == torch.float32
    assert compute.compute_dtype(torch.float32, "cpu", 10**6) == torch.float32
    assert compute.compute_dtype(torch.bfloat16, "cuda", 10**6) == torch.bfloat16  # GPUs have 16-bit matmuls
    assert compute.compute_dtype(torch.bfloat16, "cpu", 10**15) == torch.bfloat16  # float32 would not fit
    monkeypatch.setenv(compute.OVERRIDE, "stored")
    assert compute.compute_dtype(torch.bfloat16, "cpu", 10**6) == torch.bfloat16
    monkeypatch.delenv(compute.OVERRIDE)
    monkeypatch.setattr(compute, "half_is_slow", lambda dtype: False)
    assert compute.compute_dtype(torch.bfloat16, "cpu", 10**6) == torch.bfloat16
    monkeypatch.setenv(compute.OVERRIDE, "float32")  # the same numbers as on a CPU without fast bf16
    assert compute.compute_dtype(torch.bfloat16, "cpu", 10**6) == torch.float32
    assert compute.compute_dtype(torch.bfloat16, "cuda", 10**6) == torch.bfloat16
    monkeypatch.setenv(compute.OVERRIDE, "fp32")
    with pytest.raises(UsageError, match="expected"):
        compute.compute_dtype(torch.bfloat16, "cpu", 10**6)


def test_float32_bytes_bounds_quantized_checkpoints(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    assert compute.float32_bytes(tmp_path, None) == 2000
    q = {"config_groups": {"group_0": {"weights": {"num_bits": 4}}}}
    assert compute.float32_bytes(tmp_path, q) == 8000  # int4 weights de-quantize to 8x their bytes


def test_stored_dtype_from_config():
    from transformers import LlamaConfig

    assert compute.stored_dtype({"dtype": "bfloat16"}) == torch.bfloat16
    assert compute.stored_dtype({"torch_dtype": "float16"}) == torch.float16
    assert compute.stored_dtype({}) == torch.float32
    assert compute.stored_dtype(LlamaConfig(dtype=torch.float16)) == torch.float16
    assert compute.stored_dtype(LlamaConfig(dtype="bfloat16")) == torch.bfloat16


class _Net(torch.nn.Module):
    _keep_in_fp32_modules = ["gate"]

    def __init__(self):
        super().__init__()
        self.fc, self.gate = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.register_buffer("table", torch.randn(8))
        self.register_buffer("freqs", torch.randn(8), persistent=False)


def test_saved_as_rounds_what_is_saved_and_restores_float32():
    net = _Net()
    w, freqs, gate = net.fc.weight.detach().clone(), net.freqs.clone(), net.gate.weight.detach().clone()
    with compute.saved_as(net, torch.bfloat16):
        assert net.fc.weight.dtype == net.fc.bias.dtype == net.table.dtype == torch.bfloat16
        assert net.gate.weight.dtype == torch.float32  # the architecture keeps it in float32
        assert net.freqs.dtype == torch.float32  # not saved: left exact
    assert net.fc.weight.dtype == torch.float32
    assert torch.equal(net.fc.weight, w.to(torch.bfloat16).float())  # rounded as saved
    assert torch.equal(net.freqs, freqs) and torch.equal(net.gate.weight, gate)


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_float32_compute_writes_the_stored_dtype(tiny_model, tmp_path, slow_half, monkeypatch, method):
    """A bf16 model computed in float32 is written in bf16 (scales and dense tensors), the same
    size as one computed in bf16; RTN reads no activations, so its checkpoint is byte-identical."""
    src = tiny_model("llama")
    out = {}
    for how in ("float32", "stored"):
        if how == "stored":
            monkeypatch.setenv(compute.OVERRIDE, "stored")
        out[how] = tmp_path / how
        stage = {"stage": "quantize", "scheme": "w4a16", "group_size": 32, "method": method, "samples": 4}
        recipe = validate(
            {"model": str(src), "output": str(out[how]), "evaluate": {"enabled": False}, "stages": [stage]}
        )
        api.run(recipe, Console(file=io.StringIO()))
    f32, stored = _tensors(out["float32"]), _tensors(out["stored"])
    assert {k: v.dtype for k, v in f32.items()} == {k: v.dtype for k, v in stored.items()}
    assert {v.dtype for k, v in f32.items() if k.endswith(("weight_scale", "norm.weight"))} == {torch.bfloat16}
    assert json.loads((out["float32"] / "config.json").read_text())["dtype"] == "bfloat16"
    sizes = [(out[h] / "model.safetensors").stat().st_size for h in out]
    assert sizes[0] == sizes[1]
    if method == "rtn":
        assert all(torch.equal(f32[k], stored[k]) for k in f32)
