"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian.

Pure function on tensors. Grids and rounding are those of `qparams`, so the integers it
returns are stored as they are.
"""

from __future__ import annotations

import torch

from compress.primitives.qparams import NF4_ZERO, Grid, compute_qparams, nf4_codes, nf4_values, search_range


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


def _group_params(
    w: torch.Tensor, grid: Grid, scale_dtype: torch.dtype, range_search: bool, importance: torch.Tensor | None
):
    if range_search:
        return search_range(w, grid, scale_dtype, importance=importance)
    return compute_qparams(w, grid, scale_dtype)


INNER = 32  # columns per sub-block of immediate updates


def _round(
    w: torch.Tensor, scale: torch.Tensor, scale_f: torch.Tensor, zp: torch.Tensor | None, grid: Grid
) -> tuple[torch.Tensor, torch.Tensor]:
    """One column: w [O] float32; scale [O] in its stored dtype and as float32; zp [O] float,
    or None when it is 0 (symmetric) -> (q, w_hat float32). The arithmetic of
    `qparams.quantize` / `dequantize`, without their reshapes."""
    x = w / scale_f
    if grid.kind == "nf4":
        q = nf4_codes(x)
        return q, nf4_values(q) * scale_f  # scales are float32, as bitsandbytes stores them
    if grid.kind == "float":
        q = x.clamp_(grid.qmin, grid.qmax).to(torch.float8_e4m3fn)
        return q, (q.to(scale.dtype) * scale).float()
    q = x.round_()
    if zp is None:
        q = q.clamp_(grid.qmin, grid.qmax)
        return q, (q.to(scale.dtype) * scale).float()
    q = q.add_(zp).clamp_(grid.qmin, grid.qmax)
    return q, ((q - zp).to(scale.dtype) * scale).float()


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
    keep: torch.Tensor | None = None,
    drift: torch.Tensor | None = None,
    drift_weight: float = 0.25,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [O, I], H [I, I] -> (q [O, I], scale [O, G], zp [O, G]) in W's original column order.

    Groups are always consecutive columns of the original order (the format has no g_idx):
    without actorder each group's range is chosen when GPTQ reaches it, from the updated
    weights; with actorder columns go in order of decreasing Hessian diagonal and every
    group's range is fixed up front.
    keep [O, I] bool: weights outside it (pruned) are stored as exact zeros and the error of
    zeroing them is spread like any rounding error, so sparsity survives quantization.
    drift [I, I]: 2/n sum (x_float - x) x^T, how the layer's inputs moved from the unchanged model's (GPTAQ, Li et
    al. 2025, arXiv 2504.02692). The target becomes W x_float instead of W x: as each column is fixed, its share of
    W (x_float - x) goes to the columns not yet quantized through P = upper(drift U^T) U (U the upper Cholesky factor
    of H^-1), scaled by `drift_weight` (the paper's alpha: the drift is estimated on the same few samples as H).
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
    if drift is not None:
        drift = drift.float().to(dev).clone()
        drift[:, dead] = 0
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
    if keep is not None:
        keep = keep.to(dev)[:, perm]
        W *= keep
    Hinv = inverse_hessian_factor(H, dampening)  # [I, I] upper
    P = None
    if drift is not None:  # [I, I] strictly upper: column i's weight -> the later columns' correction
        drift = drift[perm][:, perm]
        P = drift_weight * (drift @ Hinv.T).triu_(diagonal=1) @ Hinv
    group_of = perm // g  # group (original order) of each processed column

    q_dtype = {"float": torch.float8_e4m3fn, "nf4": torch.uint8}.get(grid.kind, torch.int8)
    Q = torch.zeros(out_f, in_f, dtype=q_dtype, device=dev)
    group_of = group_of.tolist()
    s_col = sf_col = z_col = last = None
    # Lazy updates at two levels: within a sub-block of `inner` columns each column's error
    # is applied at once (rank-1); sub-blocks and blocks pass theirs on as one matmul.
    # Sub-blocks start on group boundaries, so a group's range sees all earlier errors.
    inner = INNER if static or (g % INNER == 0 and block_size % INNER == 0) else block_size
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()  # [O, b]
        Err1 = torch.zeros_like(W1)
        Pre1 = torch.zeros_like(W1) if P is not None else None  # each column's weight as it was quantized
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1).tolist()
        for j1 in range(0, i2 - i1, inner):
            j2 = min(j1 + inner, i2 - i1)
            for i in range(j1, j2):
                col = i1 + i
                gi = group_of[col]
                if not static and col % g == 0:  # first column of a group: choose its range now
                    block = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                    s, z = _group_params(
                        block,
                        Grid(grid.bits, grid.kind, grid.symmetric, g),
                        scale_dtype,
                        range_search,
                        diag[perm][col : col + g],
                    )
                    scale[:, gi : gi + 1], zp[:, gi : gi + 1] = s, z
                if gi != last:
                    s_col, last = scale[:, gi], gi
                    sf_col, z_col = s_col.float(), None if grid.symmetric else zp[:, gi].float()
                w = W1[:, i]  # [O]
                q, w_hat = _round(w, s_col, sf_col, z_col, grid)
                if keep is not None:
                    w_hat = torch.where(keep[:, col], w_hat, 0.0)
                Q[:, col] = q
                err = (w - w_hat) / d[i]  # [O]
                if P is not None:
                    Pre1[:, i] = w
                    W1[:, i + 1 : j2].addr_(Pre1[:, i], P[i1 + i, i1 + i + 1 : i1 + j2])
                W1[:, i:j2].addr_(err, Hinv1[i, i:j2], alpha=-1)
                Err1[:, i] = err
            W1[:, j2:] -= Err1[:, j1:j2] @ Hinv1[j1:j2, j2:]
            if P is not None:
                W1[:, j2:] += Pre1[:, j1:j2] @ P[i1 + j1 : i1 + j2, i1 + j2 : i2]
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        if P is not None:
            W[:, i2:] += Pre1 @ P[i1:i2, i2:]

    inv = torch.argsort(perm)
    Q = Q[:, inv]
    if keep is not None:  # the integer that dequantizes to exactly 0 is the zero point (NF4: its code of 0)
        if grid.kind == "int":
            zero = zp.repeat_interleave(g, dim=1)
        else:
            zero = torch.tensor(NF4_ZERO if grid.kind == "nf4" else 0, device=dev)
        Q = torch.where(keep[:, inv], Q, zero.to(Q.dtype))
    return Q, scale, zp
