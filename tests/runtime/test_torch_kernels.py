"""Every torch kernel path against the de-quantized (or dense) matmul on random shapes: on CPU
where torch has the op, on CUDA when a GPU is present."""

import os
import subprocess
import sys

import pytest
import torch

from compress.formats.stored import StoredLinear
from compress.primitives.masks import keep_n_of_m
from compress.primitives.qparams import fake_quantize_tokens
from compress.runtime import torch_kernels as tk

CUDA_REASON = "no CUDA device: the CUDA kernels (tiled int4 packing, cuBLAS fp8/int8) are not exercised"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON))]


def stored(n, k, bits, kind="int", group=None, symmetric=True, seed=0) -> StoredLinear:
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group is None else k // group
    scale = torch.rand(n, groups, generator=g) * 0.02 + 0.001
    if kind == "float":
        q = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    else:
        q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), generator=g, dtype=torch.int8)
    return StoredLinear(q, scale, torch.zeros(n, groups, dtype=torch.int8), bits, kind, symmetric, group)


def fake_quant_tokens(x, qmax, to):
    s = (x.abs().amax(-1, keepdim=True) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
    return to(x / s) * s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,group", [((64, 256), 32), ((96, 512), 64), ((128, 512), 128), ((64, 1024), 256)])
def test_int4_weight_only(device, shape, group):
    n, k = shape
    w = stored(n, k, 4, group=group)
    bias = torch.randn(n)
    lin = tk.Int4Linear(w, bias, torch.device(device), torch.bfloat16)
    x = torch.randn(3, 5, k, dtype=torch.bfloat16, device=device)
    want = x.float() @ w.dequantized().to(device).t() + bias.to(device)
    got = lin(x).float()
    assert got.shape == (3, 5, n)
    assert (got - want).norm() / want.norm() < 0.01  # bf16 activations and scales


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("act,cls", [("int8", tk.Int8Linear), ("int8-asym", tk.Int8ZeroPointLinear)])
def test_int8_matmul(device, m, act, cls):
    """Inputs rounded per token as compressed-tensors does (test_qparams checks that rule against its forward)."""
    if not tk.int_mm_exact(device):
        pytest.skip("torch._int_mm saturates on this CPU (no VNNI): compress uses no int8 kernel here")
    w = stored(64, 256, 8)
    lin = cls(w, torch.randn(64), torch.device(device), torch.float32)
    x = torch.randn(m, 256, device=device) * 2 + 1.5  # off-centre: a zero point has something to do
    want = fake_quantize_tokens(x, act) @ w.dequantized().to(device).t() + lin.bias
    torch.testing.assert_close(lin(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert tk.kernel_for(w, act, torch.device(device))[0] is cls


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_scaled_mm(device):
    if not tk.scaled_mm_rowwise(device):
        pytest.skip(
            f"torch {torch.__version__}'s _scaled_mm takes one scale per tensor here: compress uses no fp8 kernel"
        )
    w = stored(64, 256, 8, kind="float")
    lin = tk.Fp8Linear(w, None, torch.device(device), torch.float32)
    x = torch.randn(9, 256, device=device)
    xq = fake_quant_tokens(x, tk.FP8_MAX, lambda v: v.clamp(-tk.FP8_MAX, tk.FP8_MAX).to(torch.float8_e4m3fn).float())
    want = xq @ w.dequantized().to(device).t()
    torch.testing.assert_close(lin(x), want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


def test_kernel_choice_and_fallback_warning():
    assert tk.kernel_for(stored(16, 64, 4, group=32), None)[0] is tk.Int4Linear
    assert tk.kernel_for(stored(8, 64, 8), "int8")[0] is (tk.Int8Linear if tk.int_mm_exact("cpu") else None)
    assert tk.kernel_for(stored(8, 64, 8, kind="float"), "fp8")[0] is (
        tk.Fp8Linear if tk.scaled_mm_rowwise("cpu") else None
    )
    cls, why = tk.kernel_for(stored(8, 64, 8), None)
    assert cls is None and "w8a16" in why
    assert tk.kernel_for(stored(8, 64, 4, group=32), None)[0] is None  # torch's int4 layout wants N % 16 == 0
    model = torch.nn.Sequential(torch.nn.Linear(64, 16))
    with pytest.warns(UserWarning, match="w8a16"):
        name = tk.use_kernels(model, {"0": stored(16, 64, 8)}, None)
    assert "dense" in name and isinstance(model[0], torch.nn.Linear)
    assert "int4" in tk.use_kernels(model, {"0": stored(16, 64, 4, group=32)}, None) and isinstance(
        model[0], tk.Int4Linear
    )


def two_four(n, k, dtype=torch.bfloat16, seed=0) -> torch.Tensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return (w * keep_n_of_m(w.abs(), 2, 4)).to(dtype)


def test_sparse24_reasons():
    assert "not 2:4" in tk.sparse24_reason(torch.randn(64, 64, dtype=torch.bfloat16))
    assert "not 2:4" in tk.sparse24_reason(torch.zeros(64, 66))
    assert "float64" in tk.sparse24_reason(two_four(64, 64, torch.float64))
    assert "40x64" in tk.sparse24_reason(two_four(40, 64))
    assert "CUDA only" in tk.sparse24_reason(two_four(64, 64))  # a CPU tensor


def tiny_llama_2_4(device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(device, torch.bfloat16).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                mod.weight.mul_(keep_n_of_m(mod.weight.abs(), 2, 4))
    return model


def test_sparse24_falls_back_on_cpu_with_one_warning():
    model = tiny_llama_2_4("cpu")
    with pytest.warns(UserWarning, match="14 of 14 linears stay dense .*CUDA only"):
        name = tk.use_sparse24(model)
    assert (
        name.startswith("torch dense bfloat16") and type(model.model.layers[0].mlp.up_proj.weight) is torch.nn.Parameter
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
def test_sparse24_semi_structured_cuda():
    model = tiny_llama_2_4("cuda")
    ids = torch.randint(0, 256, (2, 40), device="cuda")
    with torch.no_grad():
        want, want_one = model(ids).logits.float(), model(ids[:1, :1]).logits.float()
        assert "semi-structured" in tk.use_sparse24(model)  # no warning: every linear qualifies
        got, got_one = model(ids).logits.float(), model(ids[:1, :1]).logits.float()  # prefill- and decode-shaped
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, torch.sparse.SparseSemiStructuredTensor)
    for g, w in ((got, want), (got_one, want_one)):
        assert (g - w).norm() / w.norm() < 0.02  # bf16 accumulation order differs


PROBE = """
import torch
from compress.runtime import torch_kernels as tk
g = torch.Generator().manual_seed(0)
a = torch.randint(-128, 128, (64, 256), dtype=torch.int8, generator=g)
b = torch.randint(-128, 128, (96, 256), dtype=torch.int8, generator=g)
exact = torch.equal(torch._int_mm(a, b.t()), (a.double() @ b.double().t()).to(torch.int32))
print(tk.int_mm_exact("cpu"), exact)
"""


@pytest.mark.parametrize("isa", [None, "AVX2"])
def test_int_mm_exact_never_vouches_for_a_saturating_kernel(isa):
    """Without VNNI, oneDNN may multiply int8 pairs with vpmaddubsw, whose int16 sums saturate (seen on one
    x86 machine with ONEDNN_MAX_CPU_ISA=AVX2; another x86 machine summed exactly under the same switch). Whatever
    this machine does, the check must not call exact a kernel that gets random full-range products wrong."""
    env = {**os.environ, **({"ONEDNN_MAX_CPU_ISA": isa} if isa else {})}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1000:]
    said, probe = proc.stdout.split()
    assert said == "False" or probe == "True", proc.stderr[-1000:]


def test_int8_kernel_is_refused_where_int_mm_saturates(monkeypatch):
    monkeypatch.setattr(tk, "int_mm_exact", lambda device_type: False)
    cls, why = tk.kernel_for(stored(8, 64, 8), "int8")
    assert cls is None and "saturates" in why


def test_fp8_kernel_is_refused_where_scaled_mm_takes_one_scale(monkeypatch):
    """torch 2.11's CPU _scaled_mm asserts on per-token scales (seen on the H200 machine): a de-quantized matmul."""
    monkeypatch.setattr(tk, "scaled_mm_rowwise", lambda device_type: False)
    cls, why = tk.kernel_for(stored(8, 64, 8, kind="float"), "fp8")
    assert cls is None and "per-token scales" in why and "de-quantized" in why
