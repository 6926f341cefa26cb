"""The layer-by-layer runner's helpers."""

import subprocess
import sys

import pytest
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


def test_float_stream_carries_the_unchanged_models_hidden_states(tiny_model):
    """With `float_stream`, each layer sees the unchanged model's hidden state after it as
    `inputs.reference`, while its inputs are what the changed layers before it produced."""
    from transformers import AutoModelForCausalLM

    from compress.calibrate import layer_by_layer

    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32).eval()
    batches = [torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        want = [model(b, output_hidden_states=True).hidden_states for b in batches]  # [embeddings, layer 0, ...]
    seen = []

    def calibrate(i, layer, inputs):
        seen.append(([h.clone() for h in inputs.hidden], [r.clone() for r in inputs.reference]))
        with torch.no_grad():
            layer.mlp.down_proj.weight.mul_(0.5)  # the layer changes: the next one's inputs differ

    layer_by_layer(model, batches, torch.device("cpu"), calibrate, float_stream=True)
    (hidden0, ref0), (hidden1, ref1) = seen
    for b in range(2):
        assert torch.allclose(hidden0[b], want[b][0]) and torch.allclose(ref0[b], want[b][1], atol=1e-5)
        with torch.no_grad():  # transformers' last hidden state is after the final norm (left unchanged)
            assert torch.allclose(model.model.norm(ref1[b]), want[b][2], atol=1e-5)
        assert not torch.allclose(hidden1[b], want[b][1], atol=1e-3)  # the changed layer 0's outputs


THREADED_CHOLESKY = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from compress.calibrate import Gather, calibrate_linears

device = torch.device(sys.argv[1])
torch.manual_seed(0)
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
model = LlamaForCausalLM(config).eval()
linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
batches = [torch.randint(0, 256, (2, 32)) for _ in range(2)]

def treat(group, stats):
    h = stats.hessian.H
    eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    return [torch.linalg.cholesky_ex(h + 0.01 * h.diagonal().mean() * eye).info.item() for _ in group]

calibrate_linears(model, linears, batches, device, gather=lambda *a: Gather(hessian=True), treat=treat, threads=2)
print("ok")
"""


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))],
)
def test_threads_may_make_the_first_cholesky_on_cuda(device):
    """Pool threads making a process's first CUDA Cholesky at once failed ("lazy wrapper should be called at most
    once": GPTQ and SparseGPT on an H200, torch 2.11); each run is a fresh process, where that first call happens."""
    proc = subprocess.run(
        [sys.executable, "-c", THREADED_CHOLESKY, device], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
