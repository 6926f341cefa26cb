"""SparseGPT (Frantar & Alistarh, 2023): prune a weight column by column, choosing what to
drop by w^2 / [H^-1]_jj^2 and spreading each column's pruning error over the columns not yet
visited, weighted by the inverse Hessian (the optimal brain surgeon update GPTQ also uses).

Pure function on tensors; shares the Hessian factorization with GPTQ.
"""

from __future__ import annotations

import torch

from compress.primitives.gptq import INNER, inverse_hessian_factor
from compress.primitives.masks import keep_top


@torch.no_grad()
def sparsegpt(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
    rows: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """W [O, I], H [I, I] -> (pruned W float32 [O, I], kept mask [O, I]).

    Unstructured: in each block of `block_size` columns, every row segment given by `rows`
    (the sizes of linears stacked in W; default one segment) keeps the highest (1 - sparsity)
    of its scores, so each linear gets exactly its share as if pruned alone.
    N:M: in each M consecutive columns every row keeps N.
    """
    W = W.float().clone()
    H = H.float().to(W.device).clone()
    out_f, in_f = W.shape
    if nm and (in_f % nm[1] or block_size % nm[1] or INNER % nm[1]):
        raise ValueError(f"{nm[0]}:{nm[1]} needs widths and blocks divisible by {nm[1]}")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = inverse_hessian_factor(H, dampening)  # [I, I] upper
    mask = torch.ones(out_f, in_f, dtype=torch.bool, device=W.device)
    bounds = torch.tensor([0, *(rows or [out_f])]).cumsum(0).tolist()

    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()  # [O, b]
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        M1 = torch.ones_like(W1, dtype=torch.bool)
        if nm is None:
            score = W1.pow(2) / d.pow(2)  # [O, b]
            for r1, r2 in zip(bounds[:-1], bounds[1:]):
                M1[r1:r2] = keep_top(score[r1:r2], sparsity, per_row=False)
        dl = d.tolist()
        for j1 in range(0, i2 - i1, INNER):
            j2 = min(j1 + INNER, i2 - i1)
            for i in range(j1, j2):
                if nm and i % nm[1] == 0:
                    n, m = nm
                    score = W1[:, i : i + m].pow(2) / d[i : i + m].pow(2)
                    M1[:, i : i + m].scatter_(1, torch.topk(score, m - n, dim=1, largest=False).indices, False)
                w = W1[:, i]
                q = w * M1[:, i]
                err = (w - q) / dl[i]
                W1[:, i:j2].addr_(err, Hinv1[i, i:j2], alpha=-1)
                W1[:, i] = q
                Err1[:, i] = err
            W1[:, j2:] -= Err1[:, j1:j2] @ Hinv1[j1:j2, j2:]
        W[:, i1:i2] = W1
        mask[:, i1:i2] = M1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W *= mask  # columns' own update leaves exact zeros; this makes it so for any rounding
    return W, mask
