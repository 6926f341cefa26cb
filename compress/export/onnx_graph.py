"""A small ONNX graph builder and the one op our exports care most about: linear layers as
float MatMul or as ONNX Runtime's `MatMulNBits` carrying our integers exactly."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from compress.formats.stored import StoredLinear
from compress.primitives.qparams import Grid, compute_qparams, quantize

MS = "com.microsoft"
NBITS_BLOCKS = (256, 128, 64, 32, 16)  # block lengths ONNX Runtime's CPU kernels take
NBITS = (2, 4, 8)  # bit widths its MatMulNBits takes (1.32: "additional bits support is planned")


class Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0
        self._const_names: set[str] = set()
        self._as_float: dict[str, str] = {}  # initializer name -> its one Cast to float32

    def input(self, name: str, elem: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, value: str, name: str, elem: int, shape: list) -> None:
        if value != name:
            self.op("Identity", [value], out=name)
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer; a name given again refers to the first one (for shared constants)."""
        if name not in self._const_names:
            self._const_names.add(name)
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def float_const(self, name: str, array: np.ndarray) -> str:
        """`const` read as float32: a narrower initializer gets one Cast, shared by every reader."""
        const = self.const(name, array)
        if array.dtype == np.float32:
            return const
        if const not in self._as_float:
            self._as_float[const] = self.op("Cast", [const], to=TensorProto.FLOAT)
        return self._as_float[const]

    def op(
        self, op_type: str, inputs: list[str], outs: int | str = 1, out: str | None = None, domain: str = "", **attrs
    ) -> str | list[str]:
        """outs: how many outputs, or a pattern like "x--x" (x: wanted, -: optional, left out)."""
        self._count += 1
        base = f"/{op_type}_{self._count}"
        if out:
            names = [out]
        elif isinstance(outs, str):
            names = [f"{base}/out{i}" if c == "x" else "" for i, c in enumerate(outs)]
        else:
            names = [f"{base}/out{i}" for i in range(outs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=base, domain=domain or None, **attrs))
        wanted = [n for n in names if n]
        return wanted[0] if len(wanted) == 1 else wanted

    def model(self, name: str, opset: int = 21) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.inits)
        opsets = [helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
        return helper.make_model(graph, opset_imports=opsets, ir_version=10, producer_name="compress")


@dataclass(frozen=True)
class NBits:
    """Weights for `MatMulNBits`: B [N, K/block, block*bits/8] uint8, scales [N * K/block] (float16 where that holds
    them exactly: half the bytes, cast to float32 in the graph)."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None  # uint8, None: the op's default 2**(bits-1) (symmetric)
    bits: int
    block: int
    k: int
    n: int
    # A table's (embedding, output layer) most used rows with their rounding error quantized again, on the same bits
    # and blocks (export/tables.py: REFINED_ROWS): the graph adds `refined` [R, K] to those rows.
    refined_rows: np.ndarray | None = None  # [R] int64, ascending
    refined: NBits | None = None


def nbits_block(k: int, group_size: int | None) -> int | None:
    """The MatMulNBits block for groups of `group_size` (None: one per row): a power of two
    that divides the group, so each block has one scale and the values carry over exactly."""
    group = group_size or k
    return next((b for b in NBITS_BLOCKS if group % b == 0 and k % b == 0), None)


def pack_nbits(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, bits: int, block: int) -> NBits:
    """q [N, K] signed ints on a grid with scale/zero_point [N, G] (G groups per row). The
    op reads unsigned codes u = q + 2**(bits-1), 8/bits codes per byte, lowest bits first."""
    n, k = q.shape
    per_group = (k // scale.shape[1]) // block  # blocks per group
    offset = 1 << (bits - 1)
    u = _pack_bytes((q.astype(np.int16) + offset).astype(np.uint8).reshape(n, k // block, block), bits)
    scales = np.repeat(half_if_exact(scale), per_group, axis=1)  # [N, K/block]
    zp = None
    if zero_point is not None and np.any(zero_point):
        codes = np.repeat((zero_point.astype(np.int16) + offset).astype(np.uint8), per_group, axis=1)
        per_byte = 8 // bits
        codes = np.pad(codes, ((0, 0), (0, -codes.shape[1] % per_byte)), constant_values=offset)
        zp = _pack_bytes(codes, bits).reshape(-1)
    return NBits(np.ascontiguousarray(u), scales.reshape(-1), zp, bits, block, k, n)


def half_if_exact(scale: np.ndarray) -> np.ndarray:
    """Scales as float16 when every value survives the round trip (a bfloat16 checkpoint's always do, but for
    subnormals), else float32: the graph casts them back, so the file halves and the values stay exact."""
    half = scale.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), scale.astype(np.float32)) else scale.astype(np.float32)


def scales_of(g: Graph, name: str, w: NBits) -> str:
    """w's scales as float32 in the graph (ONNX Runtime folds the cast of a float16 initializer once, at load)."""
    return g.float_const(f"{name}.scales", w.scales)


def _pack_bytes(u: np.ndarray, bits: int) -> np.ndarray:
    """[..., M] codes of `bits` (2, 4 or 8) -> [..., M * bits / 8] bytes, the first code in the lowest bits."""
    per_byte = 8 // bits
    out = np.zeros(u.shape[:-1] + (u.shape[-1] // per_byte,), np.uint8)
    for i in range(per_byte):
        out |= u[..., i::per_byte] << (i * bits)
    return out


def _unpack_bytes(b: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `_pack_bytes`."""
    per_byte, mask = 8 // bits, (1 << bits) - 1
    return np.stack([(b >> (i * bits)) & mask for i in range(per_byte)], -1).reshape(b.shape[:-1] + (-1,))


def nbits_block_of(w: StoredLinear) -> int | None:
    """The MatMulNBits block a stored grid maps onto exactly; None for fp8 or no fitting block."""
    if w.kind != "int" or w.bits not in NBITS:
        return None
    return nbits_block(w.q.shape[1], w.group_size)


def nbits_from_stored(w: StoredLinear) -> NBits | None:
    """None when the stored grid has no exact MatMulNBits form (see `nbits_block_of`)."""
    block = nbits_block_of(w)
    if block is None:
        return None
    return pack_nbits(w.q.numpy(), w.scale.numpy(), w.zero_point.numpy(), w.bits, block)


def rtn_nbits(weight: np.ndarray, bits: int, block: int, symmetric: bool = True) -> NBits:
    """Round-to-nearest on compress's grid, scales computed in float16 (a table's, a refined row's correction)."""
    grid = Grid(bits, "int", symmetric, block)
    w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
    scale, zp = compute_qparams(w, grid, torch.float16)
    return pack_nbits(quantize(w, scale, zp, grid).numpy(), scale.float().numpy(), zp.numpy(), bits, block)


def zero_codes(w: NBits) -> np.ndarray:
    """[N, K/block] the zero point codes (the op's default 2**(bits-1) when w has none)."""
    blocks = w.k // w.block
    if w.zero_points is None:
        return np.full((w.n, blocks), 1 << (w.bits - 1), dtype=np.float32)
    per_row = -(-blocks * w.bits // 8)
    return _unpack_bytes(w.zero_points.reshape(w.n, per_row), w.bits)[:, :blocks].astype(np.float32)


def dequantize_nbits(w: NBits) -> np.ndarray:
    """[N, K] float32: what MatMulNBits multiplies by, refined rows included."""
    codes = _unpack_bytes(w.packed, w.bits)
    q = codes.reshape(w.n, w.k // w.block, w.block).astype(np.float32) - zero_codes(w)[..., None]
    out = (q * w.scales.astype(np.float32).reshape(w.n, -1, 1)).reshape(w.n, w.k)
    if w.refined is not None:
        out[w.refined_rows] += dequantize_nbits(w.refined)
    return out


def with_refined_rows(w: NBits, weight: np.ndarray, rows: np.ndarray) -> NBits:
    """`w` (the table `weight` [N, K] rounded) with the rounding error of `rows` rounded to nearest on w's grid: a
    second pass as fast as the first in MatMulNBits, where 8-bit rows would take its slow 8-bit float path."""
    if not len(rows):
        return w
    rows = np.asarray(rows, dtype=np.int64)
    error = weight[rows] - dequantize_nbits(w)[rows]
    return dataclasses.replace(w, refined_rows=rows, refined=rtn_nbits(error, w.bits, w.block))


def concat_nbits(parts: list[NBits]) -> NBits | None:
    """Stack linears that read the same input along N (q/k/v, gate/up); None if they differ."""
    first = parts[0]
    if any(
        (p.bits, p.block, p.k, p.zero_points is None) != (first.bits, first.block, first.k, first.zero_points is None)
        for p in parts
    ):
        return None
    zps = None if first.zero_points is None else np.concatenate([p.zero_points for p in parts])
    return NBits(
        np.concatenate([p.packed for p in parts]),
        np.concatenate([p.scales for p in parts]),
        zps,
        first.bits,
        first.block,
        first.k,
        sum(p.n for p in parts),
    )


def matmul_nbits(g: Graph, x: str, name: str, w: NBits, accuracy_level: int, bias: np.ndarray | None = None) -> str:
    """x @ w^T (+ bias); a table's refined rows with their corrections added."""
    inputs = [x, g.const(f"{name}.qweight", w.packed), scales_of(g, name, w)]
    inputs.append(g.const(f"{name}.qzeros", w.zero_points) if w.zero_points is not None else "")
    if bias is not None:
        inputs += ["", g.const(f"{name}.bias", bias.astype(np.float32))]  # g_idx unused
    while inputs[-1] == "":
        inputs.pop()
    y = g.op(
        "MatMulNBits", inputs, domain=MS, K=w.k, N=w.n, bits=w.bits, block_size=w.block, accuracy_level=accuracy_level
    )
    if w.refined is None:
        return y
    # the refined rows' corrections [..., R] added to their outputs in y [..., N]
    fix = matmul_nbits(g, x, f"{name}.refined", w.refined, accuracy_level)
    at = g.op("Expand", [g.const(f"{name}.refined_rows", w.refined_rows), g.op("Shape", [fix])])
    return g.op("ScatterElements", [y, at, fix], axis=-1, reduction="add")


def gather_nbits(g: Graph, ids: str, name: str, w: NBits) -> str:
    """Rows of a quantized table [N, K] (an embedding) at `ids` [B, S] -> [B, S, K]: GatherBlockQuantized on
    MatMulNBits' own B, scales and zero points (same initializer names as `matmul_nbits(..., name, w)`, viewed as
    [N, K*bits/8], [N, K/block] and [N, K/block*bits/8]: the same bytes), so a tied output layer stores the table
    once."""
    blocks = w.k // w.block
    data = g.op("Reshape", [g.const(f"{name}.qweight", w.packed), g.const(f"{name}.rows_bytes", _shape(w.n, -1))])
    scales = g.op("Reshape", [scales_of(g, name, w), g.const(f"{name}.scales_blocks", _shape(w.n, blocks))])
    inputs = [data, ids, scales]
    if w.zero_points is not None:
        zeros = g.const(f"{name}.qzeros", w.zero_points)
        inputs.append(g.op("Reshape", [zeros, g.const(f"{name}.qzeros_rows", _shape(w.n, -1))]))
    rows = g.op(
        "GatherBlockQuantized", inputs, domain=MS, bits=w.bits, block_size=w.block, gather_axis=0, quantize_axis=1
    )  # [B, S, K]
    if w.refined is None:
        return rows
    # each token's slot among the refined rows (R for the others: clipped to a valid slot, its correction dropped)
    n_refined = len(w.refined_rows)
    slots = np.full(w.n, n_refined, dtype=np.int16 if n_refined < 2**15 else np.int32)  # 2 bytes a token
    slots[w.refined_rows] = np.arange(n_refined)
    slot = g.op("Cast", [g.op("Gather", [g.const(f"{name}.refined_slots", slots), ids], axis=0)], to=TensorProto.INT32)
    last = g.const(f"{name}.refined_last", np.array(n_refined - 1, dtype=np.int32))
    fix = gather_nbits(g, g.op("Min", [slot, last]), f"{name}.refined", w.refined)
    refined = g.op("Unsqueeze", [g.op("LessOrEqual", [slot, last]), g.const("minus1", np.array([-1], np.int64))])
    return g.op("Where", [refined, g.op("Add", [rows, fix]), rows])


def _shape(*dims: int) -> np.ndarray:
    return np.array(dims, dtype=np.int64)


def matmul_dense(g: Graph, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None = None) -> str:
    """weight [N, K] as stored by torch; ONNX MatMul wants [K, N]."""
    y = g.op("MatMul", [x, g.const(f"{name}.weight", weight.T.astype(np.float32))])
    if bias is not None:
        y = g.op("Add", [y, g.const(f"{name}.bias", bias.astype(np.float32))])
    return y


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
