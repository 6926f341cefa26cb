"""Our calibrated integers re-expressed as llama.cpp's k-quants (super-blocks of 256 weights).

Symmetric int3 and int6 in groups of 16 are Q3_K and Q6_K: per 256 weights one float16 d and, for each
of 16 sub-blocks of 16, a signed scale (6 bits, offset 32, for Q3_K; int8 for Q6_K): w = d * sc * q with
q in -4..3 (-32..31), exactly our integers, on a sub-block scale d * sc fitted to ours.

Q4_K and Q5_K hold, per 256 weights, two float16 numbers d and dmin and, for each of 8 sub-blocks
of 32, a 6-bit scale sc and a 6-bit minimum m: w = d * sc * u - dmin * m, u in 0..15 (0..31 for
Q5_K). Our asymmetric int4/int5 grid in groups of 32 is w = s * (q - zp) = s * u - (2^(b-1) + zp) * s
with u = q + 2^(b-1): the same integers u, a sub-block scale a = s and a minimum b = (2^(b-1) + zp) * s
(groups of 64 to 256 are sub-blocks that share them).
The integers carry over exactly (GPTQ's or SignRound's choices are kept); only a and b are
rounded onto d * sc and dmin * m, and that error is reported. Rows must be multiples of 256: a
narrower or ragged row keeps the exact 32-block type (Q4_1/Q5_1; Q8_0 for groups of 16), as llama.cpp falls back.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
SUB = 32  # weights per sub-block of Q4_K / Q5_K
SUB_SYM = 16  # of Q3_K / Q6_K
KQUANT = {4: "Q4_K", 5: "Q5_K"}  # with zero points
KQUANT_SYM = {3: "Q3_K", 6: "Q6_K"}  # symmetric: sub-block scale codes, largest positive code
SCALE_MAX = {3: 31, 6: 127}
# d = max(a) / top code * f: stretches around the plain one, the least weighted squared error kept (llama.cpp's
# make_qkx quantizers search scales likewise, but also re-choose the integers, which we keep)
STRETCH = np.linspace(0.9, 1.1, 21, dtype=np.float32)


def kind(k: int, group_size: int | None, bits: int, symmetric: bool) -> str | None:
    """The k-quant our grid maps to, or None: groups of one to 16 sub-blocks (a group of 64 is two sub-blocks of 32
    with one scale) in rows of whole super-blocks."""
    sub, table = (SUB_SYM, KQUANT_SYM) if symmetric else (SUB, KQUANT)
    if bits not in table or k % QK_K or group_size is None or group_size % sub or QK_K % group_size:
        return None
    return table[bits]


def sub_block(symmetric: bool) -> int:
    return SUB_SYM if symmetric else SUB


def _super_scale(target: np.ndarray, weight: np.ndarray, top_code: int = 63) -> tuple[np.ndarray, np.ndarray]:
    """target [..., S] >= 0 per sub-block, weight [..., S] (the sum of the squared multipliers of its error) ->
    (float16 super-scale [...], codes 0..top_code [..., S]) of least weighted squared error over STRETCH."""
    top = target.max(-1, keepdims=True)  # [..., 1]
    best_err = best_d = best_c = None
    for f in STRETCH:
        d = (top * f / top_code).astype(np.float16).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.where(d > 0, np.rint(target / d), 0).clip(0, top_code)
        err = (weight * (c * d - target) ** 2).sum(-1)
        if best_err is None:
            best_err, best_d, best_c = err, d, c
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_d = np.where(better[..., None], d, best_d)
            best_c = np.where(better[..., None], c, best_c)
    return best_d[..., 0].astype(np.float16), best_c.astype(np.int16)


def _pack_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """[..., 8] 6-bit scales and minimums -> [..., 12] bytes in llama.cpp's get_scale_min_k4 layout."""
    lo_sc, hi_sc, lo_mn, hi_mn = sc[..., :4], sc[..., 4:], mn[..., :4], mn[..., 4:]
    first = lo_sc | ((hi_sc >> 4) << 6)
    second = lo_mn | ((hi_mn >> 4) << 6)
    third = (hi_sc & 0x0F) | ((hi_mn & 0x0F) << 4)
    return np.concatenate([first, second, third], -1).astype(np.uint8)


def blocks(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int) -> tuple[np.ndarray, float]:
    """q [N, K] int8 (our integers), scale and zero_point [N, K/32] -> (Q4_K/Q5_K bytes [N, K/256 * block bytes],
    relative error ||w_k - w|| / ||w|| of the k-quant's weights against ours)."""
    n, k = q.shape
    nb = k // QK_K
    offset = 1 << (bits - 1)
    u = (q.astype(np.int16) + offset).astype(np.uint8).reshape(n, nb, 8, SUB)
    a = scale.astype(np.float32).reshape(n, nb, 8)
    b = ((offset + zero_point.astype(np.float32)) * scale.astype(np.float32)).reshape(n, nb, 8)
    uf = u.astype(np.float32)
    # a's error multiplies each u, b's each weight once: weigh each sub-block's rounding by what it costs
    d, sc = _super_scale(a, (uf**2).sum(-1))
    dmin, mn = _super_scale(np.maximum(b, 0), np.full_like(b, SUB))
    w_ours = a[..., None] * uf - b[..., None]
    w_k = (d.astype(np.float32)[..., None] * sc)[..., None] * uf - (dmin.astype(np.float32)[..., None] * mn)[..., None]
    rel = float(np.sqrt(((w_k - w_ours) ** 2).sum() / max((w_ours**2).sum(), 1e-30)))
    scales = _pack_scales(sc.astype(np.uint8), mn.astype(np.uint8))
    head = [d[..., None].view(np.uint8), dmin[..., None].view(np.uint8), scales]
    pairs = u.reshape(n, nb, 4, 2, SUB)  # sub-blocks 2i (low nibbles) and 2i+1 (high nibbles) share 32 bytes
    qs = ((pairs[..., 0, :] & 0x0F) | ((pairs[..., 1, :] & 0x0F) << 4)).reshape(n, nb, 128)
    if bits == 5:  # bit 4 of weight i of sub-block j is bit j of byte i
        high = (u >> 4) & 1  # [n, nb, 8, 32]
        qh = (high << np.arange(8, dtype=np.uint8)[:, None]).sum(-2).astype(np.uint8)  # [n, nb, 32]
        head.append(qh)
    out = np.concatenate([*head, qs], -1)
    return out.reshape(n, -1), rel


def _pack_q3_scales(sc: np.ndarray) -> np.ndarray:
    """[..., 16] 6-bit codes (scale + 32) -> [..., 12] bytes: low nibbles of i and i + 8 share byte i < 8; the two
    high bits of sub-block 4k + j are bits 2k..2k+1 of byte 8 + j."""
    low, high = sc & 0x0F, sc >> 4
    first = low[..., :8] | (low[..., 8:] << 4)
    second = sum(high[..., 4 * k : 4 * k + 4] << (2 * k) for k in range(4))
    return np.concatenate([first, second], -1).astype(np.uint8)


def blocks_symmetric(q: np.ndarray, scale: np.ndarray, bits: int) -> tuple[np.ndarray, float]:
    """q [N, K] int8 (symmetric int3 / int6), scale [N, K/16] -> (Q3_K / Q6_K bytes [N, K/256 * block bytes],
    relative weight error against ours, from rounding the sub-block scales)."""
    n, k = q.shape
    nb = k // QK_K
    qs = q.astype(np.int16).reshape(n, nb, 16, SUB_SYM)
    a = scale.astype(np.float32).reshape(n, nb, 16)
    sign = np.where(a < 0, -1, 1).astype(np.int16)  # our symmetric scales carry a sign; the codes are signed too
    d, sc = _super_scale(np.abs(a), (qs.astype(np.float32) ** 2).sum(-1), SCALE_MAX[bits])
    sc = sc * sign
    w_ours = a[..., None] * qs
    w_k = (d.astype(np.float32)[..., None] * sc)[..., None] * qs
    rel = float(np.sqrt(((w_k - w_ours) ** 2).sum() / max((w_ours**2).sum(), 1e-30)))
    flat = qs.reshape(n, nb, QK_K)
    if bits == 3:  # hmask[32], qs[64], scales[12], d
        hbit = (flat >= 0).astype(np.uint8).reshape(n, nb, 8, 32)  # weight 32k + i: bit k of hmask[i]
        hmask = (hbit << np.arange(8, dtype=np.uint8)[:, None]).sum(-2).astype(np.uint8)
        low = (flat & 3).astype(np.uint8).reshape(n, nb, 2, 4, 32)  # weight 128h + 32k + i: bits 2k of qs[32h + i]
        packed = (low << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(-2).astype(np.uint8).reshape(n, nb, 64)
        parts = [hmask, packed, _pack_q3_scales((sc + 32).astype(np.uint8))]
    else:  # ql[128], qh[64], scales[16], d
        u = (flat + 32).astype(np.uint8).reshape(n, nb, 2, 2, 64)  # weight 128h + 64s + i: nibble s of ql[64h + i]
        ql = ((u[:, :, :, 0] & 0x0F) | ((u[:, :, :, 1] & 0x0F) << 4)).reshape(n, nb, 128)
        hi = (u.reshape(n, nb, 2, 4, 32) >> 4) & 3  # weight 128h + 32k + i: bits 2k of qh[32h + i]
        qh = (hi << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(-2).astype(np.uint8).reshape(n, nb, 64)
        parts = [ql, qh, sc.astype(np.int8).view(np.uint8)]
    out = np.concatenate([*parts, d[..., None].view(np.uint8)], -1)
    return out.reshape(n, -1), rel
