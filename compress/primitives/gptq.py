"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian.

Pure function on tensors. Grids and rounding are those of `qparams`, so the integers it
returns are stored as they are.
"""

from __future__ import annotations

import torch

from compress.primitives.qparams import Grid, compute_qparams, dequantize, quantize, search_range


def inverse_hessian_factor(H: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, with dampening * mean(diag H) added for stability."""
    H = H.clone()
    damp = dampening * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    for attempt in range(5):
        try:
            L = torch.linalg.cholesky(H)
            break
        except torch.linalg.LinAlgError:  # not positive definite: dampen more
            H.diagonal().add_(damp * 10**attempt)
    else:
        raise ValueError("Hessian is not positive definite even after extra dampening")
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


def _group_params(w: torch.Tensor, grid: Grid, scale_dtype: torch.dtype, range_search: bool, importance: torch.Tensor | None):
    if range_search:
        return search_range(w, grid, scale_dtype, importance=importance)
    return compute_qparams(w, grid, scale_dtype)


@torch.no_grad()
def gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    grid: Grid,
    scale_dtype: torch.dtype,
    block_size: int = 128,
    dampening: float = 0.01,
    actorder: bool = False,
    range_search: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [O, I], H [I, I] -> (q [O, I], scale [O, G], zp [O, G]) in W's original column order.

    Groups are always consecutive columns of the original order (the format has no g_idx):
    without actorder each group's range is chosen when GPTQ reaches it, from the updated
    weights; with actorder columns go in order of decreasing Hessian diagonal and every
    group's range is fixed up front.
    """
    dev = W.device
    W = W.float().clone()
    H = H.float().to(dev).clone()
    out_f, in_f = W.shape
    g = grid.group_size or in_f
    n_groups = in_f // g

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    diag = torch.diag(H).clone()

    static = actorder or grid.group_size is None
    scale = torch.empty(out_f, n_groups, dtype=scale_dtype, device=dev)
    zp = torch.zeros(out_f, n_groups, dtype=torch.int8, device=dev)
    if static:
        s, z = _group_params(W, grid, scale_dtype, range_search, diag)
        scale.copy_(s)
        zp.copy_(z)

    perm = torch.argsort(diag, descending=True) if actorder else torch.arange(in_f, device=dev)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = inverse_hessian_factor(H, dampening)  # [I, I] upper
    group_of = perm // g  # group (original order) of each processed column

    Q = torch.zeros(out_f, in_f, dtype=torch.float8_e4m3fn if grid.kind == "float" else torch.int8, device=dev)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()  # [O, b]
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            gi = int(group_of[col])
            if not static and col % g == 0:  # first column of a group: choose its range now
                block = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                s, z = _group_params(block, Grid(grid.bits, grid.kind, grid.symmetric, g), scale_dtype, range_search, diag[perm][col : col + g])
                scale[:, gi : gi + 1], zp[:, gi : gi + 1] = s, z
            w = W1[:, i : i + 1]  # [O, 1]
            q = quantize(w, scale[:, gi : gi + 1], zp[:, gi : gi + 1], grid)
            w_hat = dequantize(q, scale[:, gi : gi + 1], zp[:, gi : gi + 1]).float()
            Q[:, col] = q[:, 0]
            err = (w - w_hat) / Hinv1[i, i]  # [O, 1]
            W1[:, i:] -= err @ Hinv1[i : i + 1, i:]
            Err1[:, i : i + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    return Q[:, inv], scale, zp
