"""Low-bit linear layers for the torch runtime on CUDA, built from a checkpoint's stored integers:

    w4a16 -> torch's int4 weight-only kernel (_weight_int4pack_mm, groups of 32..256)
    fp8   -> torch._scaled_mm, e4m3 activations and weights, per-token x per-channel scales
    w8a8  -> torch._int_mm, int8 activations per token (w8a8-asym: with a zero point) x int8 weights per channel
    2:4 sparse (unquantized) -> torch's semi-structured sparse matmul (cuSPARSELt or CUTLASS)
Anything else stays a de-quantized (or dense) matmul, with a one-line warning saying why. The same
modules run on CPU where torch has the op (the tests compare each with the de-quantized
matmul there); on this project's AVX2 CPU they are slower than float32, so the CPU runtime
does not use them.
"""

from __future__ import annotations

import functools
import warnings

import torch

from compress.formats.stored import StoredLinear
from compress.primitives.masks import n_of_m_holds
from compress.primitives.qparams import INT8_ACTIVATIONS, int8_tokens

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
INT4_GROUPS = (32, 64, 128, 256)


class Int4Linear(torch.nn.Module):
    """y = x @ ((q + 8 - 8) * scale + 0)^T, with q packed by torch's int4 layout."""

    def __init__(self, w: StoredLinear, bias: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        n, k = w.q.shape
        self.n, self.k, self.group = n, k, w.group_size
        codes = (w.q.to(torch.int32) + 8).to(device)  # [N, K] in 0..15
        zero = -(w.zero_point.float()) * w.scale  # (q - zp) * s == (q + 8 - 8) * s + (-zp * s)
        # [K/g, N, 2]: scale and zero per group, torch's layout
        self.register_buffer(
            "scales_zeros", torch.stack([w.scale, zero], -1).transpose(0, 1).contiguous().to(device, dtype)
        )
        if device.type == "cuda":
            packed = (codes[:, 0::2] << 4 | codes[:, 1::2]).to(torch.uint8)
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack(packed, 8))
        else:
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        self.bias = None if bias is None else torch.nn.Parameter(bias.to(device, dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.k)
        if x.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group, self.scales_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales_zeros)
        y = y.reshape(*x.shape[:-1], self.n)
        return y if self.bias is None else y + self.bias


class Fp8Linear(torch.nn.Module):
    """torch._scaled_mm on e4m3: x rounded per token (absmax / 448), weight per channel."""

    def __init__(self, w: StoredLinear, bias: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight_t", w.q.to(device).t())  # [K, N], column-major as _scaled_mm wants
        self.register_buffer("scale_w", w.scale.reshape(1, -1).float().to(device))  # [1, N]
        self.bias = None if bias is None else torch.nn.Parameter(bias.to(device, dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        scale_x = (flat.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        xq = (flat / scale_x).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(
            xq,
            self.weight_t,
            scale_a=scale_x,
            scale_b=self.scale_w,
            out_dtype=x.dtype,
            bias=None if self.bias is None else self.bias.to(x.dtype),
        )
        return y.reshape(*x.shape[:-1], -1)


class Int8Linear(torch.nn.Module):
    """torch._int_mm: x rounded to int8 per token (absmax / 127.5), weight int8 per channel."""

    zero_point = False

    def __init__(self, w: StoredLinear, bias: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight_t", w.q.to(device).t())  # [K, N] int8, column-major
        self.register_buffer("scale_w", w.scale.reshape(1, -1).float().to(device))
        self.bias = None if bias is None else torch.nn.Parameter(bias.to(device, dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        m = flat.shape[0]
        q, scale_x, zp = int8_tokens(flat, self.zero_point)
        xq = q.to(torch.int8)
        if xq.device.type == "cuda" and m <= 16:  # cuBLAS int8 needs more than 16 rows
            xq = torch.nn.functional.pad(xq, (0, 0, 0, 32 - m))
        acc = torch._int_mm(xq, self.weight_t)[:m]
        if self.zero_point:
            acc = acc - zp.to(torch.int32) * self.weight_sum  # exact in int32
        y = acc.float() * scale_x * self.scale_w
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


class Int8ZeroPointLinear(Int8Linear):
    """torch._int_mm with a zero point per token (compressed-tensors' asymmetric dynamic activations):
    x ~ (xq - z) * s over [min(x, 0), max(x, 0)], so x @ W^T ~ s * (xq @ W^T - z * sum_k W[:, k])."""

    zero_point = True

    def __init__(self, w: StoredLinear, bias: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(w, bias, device, dtype)
        self.register_buffer("weight_sum", w.q.to(device).sum(1, dtype=torch.int32).reshape(1, -1))  # [1, N]


@functools.cache
def int_mm_exact(device_type: str) -> bool:
    """Whether torch._int_mm sums exactly on this device. On x86 CPUs without VNNI, oneDNN multiplies
    int8 pairs with vpmaddubsw, whose int16 sums saturate: forced so on one x86 machine (ONEDNN_MAX_CPU_ISA=AVX2), the
    kernel test's outputs (up to ~40 in magnitude) came out up to 15 away from the exact product; another x86
    machine (AMD EPYC, no VNNI) summed exactly under the same switch, so this is probed, not read off the CPU flags."""
    a = torch.full((32, 64), 127, dtype=torch.int8, device=device_type)
    b = torch.full((32, 64), 127, dtype=torch.int8, device=device_type)
    b[::2] = -128  # [N, K]: every other output channel the most negative
    try:
        got = torch._int_mm(a, b.t())
    except RuntimeError:
        return False
    return torch.equal(got.cpu(), (a.double() @ b.double().t()).to(torch.int32).cpu())


@functools.cache
def scaled_mm_rowwise(device_type: str) -> bool:
    """Whether torch._scaled_mm takes e4m3 with a scale per row of x and per column of w on this device. torch 2.11's
    CPU kernel takes one scale per tensor only (an internal assert, seen on the H200 machine's torch 2.11.0+cu130);
    torch 2.13's takes both; CUDA GPUs before sm_89 have no fp8 matmul at all."""
    x = torch.ones(16, 32, device=device_type).to(torch.float8_e4m3fn)  # [M, K]
    w_t = torch.ones(8, 32, device=device_type).to(torch.float8_e4m3fn).t()  # [K, N], column-major as Fp8Linear's
    scale_x, scale_w = torch.ones(16, 1, device=device_type), torch.ones(1, 8, device=device_type)
    try:
        torch._scaled_mm(x, w_t, scale_a=scale_x, scale_b=scale_w, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def kernel_for(
    w: StoredLinear, act: str | None, device: torch.device = torch.device("cpu")
) -> tuple[type[torch.nn.Module] | None, str]:
    """The kernel module for a stored grid on a device, or None and the reason there is none."""
    if w.kind == "float" and act == "fp8" and w.group_size is None:
        if not scaled_mm_rowwise(device.type):
            why = f"torch {torch.__version__}'s _scaled_mm takes no fp8 with per-token scales on this {device.type}"
            return None, f"{why}; de-quantized matmul"
        return Fp8Linear, "torch._scaled_mm (fp8)"
    if w.kind == "int" and w.bits == 8 and act in INT8_ACTIVATIONS and w.group_size is None and w.symmetric:
        if not int_mm_exact(device.type):
            return None, "torch._int_mm saturates on this CPU (no VNNI int8 instructions); de-quantized matmul"
        if act == "int8-asym":
            return Int8ZeroPointLinear, "torch._int_mm (int8, a zero point per token)"
        return Int8Linear, "torch._int_mm (int8)"
    if w.kind == "int" and w.bits == 4 and act is None and w.group_size in INT4_GROUPS:
        if w.q.shape[0] % 16:
            return (
                None,
                f"torch's int4 kernel needs output widths divisible by 16 (got {w.q.shape[0]}); de-quantized matmul",
            )
        return Int4Linear, "torch int4 weight-only (_weight_int4pack_mm)"
    if w.kind == "int" and w.bits == 8 and act is None:
        return None, "w8a16 has no int8 weight-only kernel in torch; de-quantized matmul"
    return None, f"no torch kernel for {w.bits}-bit {w.kind} weights with groups of {w.group_size}; de-quantized matmul"


def use_kernels(model: torch.nn.Module, stored: dict[str, StoredLinear], act: str | None) -> str:
    """Swap every stored linear for its kernel module (in place); returns the kernel name.
    Layers without a kernel stay de-quantized, with one warning naming why."""
    param = next(model.parameters())
    kernels = {name: kernel_for(w, act, param.device) for name, w in stored.items()}
    missing = next(((n, why) for n, (cls, why) in kernels.items() if cls is None), None)
    if missing is not None:
        warnings.warn(f"{missing[0]}: {missing[1]}", stacklevel=2)
        return f"torch dense {str(param.dtype).replace('torch.', '')} matmul ({missing[1]})"
    for name, (cls, _) in kernels.items():
        parent, _, child = name.rpartition(".")
        old = model.get_submodule(name)
        setattr(model.get_submodule(parent), child, cls(stored[name], old.bias, param.device, param.dtype))
    return ", ".join(sorted({why for _, why in kernels.values()}))


def _semi_structured_class() -> type:
    """The subclass torch.sparse.to_sparse_semi_structured builds (cuSPARSELt unless forced)."""
    sp = torch.sparse
    return (
        sp.SparseSemiStructuredTensorCUTLASS
        if sp.SparseSemiStructuredTensor._FORCE_CUTLASS
        else sp.SparseSemiStructuredTensorCUSPARSELT
    )


def sparse24_reason(weight: torch.Tensor) -> str | None:
    """Why torch's 2:4 semi-structured kernel cannot take this weight [N, K]; None when it can."""
    n, k = weight.shape
    if k % 4 or not n_of_m_holds(weight, 2, 4):
        return "weights are not 2:4 sparse"
    cls = _semi_structured_class()
    limits = cls._DTYPE_SHAPE_CONSTRAINTS.get(weight.dtype)
    if limits is None:
        return f"{cls.BACKEND} semi-structured kernels take no {str(weight.dtype).replace('torch.', '')} weights"
    if n % limits.sparse_min_rows or k % limits.sparse_min_cols:
        rows, cols = limits.sparse_min_rows, limits.sparse_min_cols
        return f"{cls.BACKEND} semi-structured kernels need weights in multiples of {rows}x{cols}, got {n}x{k}"
    if weight.device.type != "cuda":
        return "semi-structured sparse kernels run on CUDA only"
    return None


def use_sparse24(model: torch.nn.Module) -> str:
    """Give every 2:4 sparse linear (all but the output layer) torch's semi-structured sparse
    weight, in place; returns the kernel name. Linears that cannot take it stay dense, with one
    warning naming how many and why."""
    head = model.get_output_embeddings()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    dense = {n: why for n, m in linears.items() if (why := sparse24_reason(m.weight)) is not None}
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    if dense:
        name, why = next(iter(dense.items()))
        warnings.warn(f"{len(dense)} of {len(linears)} linears stay dense ({name}: {why})", stacklevel=2)
    if len(dense) == len(linears):
        return f"torch dense {dtype} matmul ({next(iter(dense.values()), 'no linears')})"
    for name, lin in linears.items():
        if name not in dense:
            lin.weight = torch.nn.Parameter(
                torch.sparse.to_sparse_semi_structured(lin.weight.detach()), requires_grad=False
            )
    part = f" on {len(linears) - len(dense)} of {len(linears)} linears" if dense else ""
    return f"torch 2:4 semi-structured sparse {dtype} matmul ({_semi_structured_class().BACKEND}){part}"
