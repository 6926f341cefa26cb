"""Our calibrated integers re-expressed as llama.cpp's k-quants (super-blocks of 256 weights).

Q4_K and Q5_K hold, per 256 weights, two float16 numbers d and dmin and, for each of 8 sub-blocks
of 32, a 6-bit scale sc and a 6-bit minimum m: w = d * sc * u - dmin * m, u in 0..15 (0..31 for
Q5_K). Our asymmetric int4/int5 grid in groups of 32 is w = s * (q - zp) = s * u - (2^(b-1) + zp) * s
with u = q + 2^(b-1): the same integers u, a sub-block scale a = s and a minimum b = (2^(b-1) + zp) * s
(groups of 64 to 256 are sub-blocks that share them).
The integers carry over exactly (GPTQ's or SignRound's choices are kept); only a and b are
rounded onto d * sc and dmin * m, and that error is reported. Rows must be multiples of 256: a
narrower or ragged row keeps the exact 32-block type (Q4_1/Q5_1), as llama.cpp falls back itself.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
SUB = 32  # weights per sub-block
KQUANT = {4: "Q4_K", 5: "Q5_K"}
# d = max(a) / 63 * f: a few stretches around the plain one, the least squared error kept (as llama.cpp searches)
STRETCH = np.linspace(0.9, 1.1, 21, dtype=np.float32)


def fits(k: int, group_size: int | None, bits: int, symmetric: bool) -> bool:
    """Groups of 32 to 256 (a group of 64 is two sub-blocks with one scale) in rows of whole super-blocks."""
    return bits in KQUANT and not symmetric and group_size in (32, 64, 128, 256) and k % QK_K == 0


def _super_scale(target: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """target [..., 8] >= 0 per sub-block, weight [..., 8] (the sum of the squared multipliers of its error) ->
    (float16 super-scale [...], 6-bit codes [..., 8]) of least weighted squared error over STRETCH."""
    top = target.max(-1, keepdims=True)  # [..., 1]
    best_err = best_d = best_c = None
    for f in STRETCH:
        d = (top * f / 63).astype(np.float16).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.where(d > 0, np.rint(target / d), 0).clip(0, 63)
        err = (weight * (c * d - target) ** 2).sum(-1)
        if best_err is None:
            best_err, best_d, best_c = err, d, c
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_d = np.where(better[..., None], d, best_d)
            best_c = np.where(better[..., None], c, best_c)
    return best_d[..., 0].astype(np.float16), best_c.astype(np.uint8)


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
    head = [d[..., None].view(np.uint8), dmin[..., None].view(np.uint8), _pack_scales(sc, mn)]
    pairs = u.reshape(n, nb, 4, 2, SUB)  # sub-blocks 2i (low nibbles) and 2i+1 (high nibbles) share 32 bytes
    qs = ((pairs[..., 0, :] & 0x0F) | ((pairs[..., 1, :] & 0x0F) << 4)).reshape(n, nb, 128)
    if bits == 5:  # bit 4 of weight i of sub-block j is bit j of byte i
        high = (u >> 4) & 1  # [n, nb, 8, 32]
        qh = (high << np.arange(8, dtype=np.uint8)[:, None]).sum(-2).astype(np.uint8)  # [n, nb, 32]
        head.append(qh)
    out = np.concatenate([*head, qs], -1)
    return out.reshape(n, -1), rel
