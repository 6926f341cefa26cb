"""Calibrated quantization, one decoder layer at a time: GPTQ, AWQ, SmoothQuant (+GPTQ/RTN).

Per layer: one pass over the calibration batches collects each target linear's input
statistics; smoothing (AWQ or SmoothQuant) folds per-channel scales into the op before
the linears; each linear is quantized (GPTQ from its Hessian, or RTN with a range chosen
for least input-weighted error); the layer's quantized outputs feed the next layer.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from compress import calibrate, heap
from compress.models.arch import Smooth, smooth_maps
from compress.primitives.gptq import gptq
from compress.primitives.hessian import Hessian
from compress.primitives.qparams import Grid, compute_qparams, dequantize, fake_quantize, fake_quantize_tokens, quantize, search_range
from compress.primitives.smoothing import awq_candidates, fold, normalized_weight_mean, smoothquant_scales
from compress.quant.rtn import QuantizedWeight

QUANT_THREADS = 2  # linears quantized at once
ERROR_TOKENS = 2048  # each layer's output error is reported on the first batches holding this many tokens


@dataclass(frozen=True)
class Options:
    method: str  # gptq | awq | smoothquant+gptq | smoothquant+rtn
    range_search: bool = True
    dampening: float = 0.01
    block_size: int = 128
    actorder: bool = False
    awq_grid: int = 20
    search_tokens: int = 2048  # input rows per smoothing group kept for the SmoothQuant alpha search
    alpha: float | None = None  # SmoothQuant strength; None: searched per smoothing group
    act: str | None = None  # "int8" or "fp8": how the scheme quantizes activations
    keep_zeros: bool = False  # a pruned model: zero weights stay zero (GPTQ would refill them)

    @property
    def uses_gptq(self) -> bool:
        return self.method.endswith("gptq")


@dataclass
class InputStats:
    """What one linear's inputs looked like during the calibration pass."""

    hessian: Hessian | None
    sq_sum: torch.Tensor  # [I] sum of x^2
    absmax: torch.Tensor  # [I] max |x|
    abs_sum: torch.Tensor  # [I] sum |x|
    n: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)  # SmoothQuant alpha search: a subset of input rows

    def add(self, x: torch.Tensor, keep: int) -> None:
        x = x.reshape(-1, x.shape[-1])  # [n, I], in the layer's dtype
        if self.hessian is not None:
            self.hessian.add(x)  # its diagonal is the sum of x^2
        else:
            self.sq_sum += x.float().pow(2).sum(0)
        a = x.abs()
        self.absmax = torch.maximum(self.absmax, a.amax(0).float())
        self.abs_sum += a.sum(0, dtype=torch.float32)
        self.n += x.shape[0]
        if keep:
            idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.n))[:keep]
            self.samples.append(x[idx].float().cpu())

    def mean_square(self) -> torch.Tensor:
        """[I] E[x^2] per input feature."""
        if self.hessian is not None:
            return self.hessian.H.diagonal() / 2
        return self.sq_sum / max(self.n, 1)

    def mean_abs(self) -> torch.Tensor:
        """[I] E|x| per input feature."""
        return self.abs_sum / max(self.n, 1)

    def rescale(self, s: torch.Tensor) -> None:
        """Inputs became x / s after a fold."""
        s = s.to(self.sq_sum.device)
        if self.hessian is not None:
            self.hessian.rescale(s)
        self.sq_sum /= s.pow(2)
        self.absmax /= s
        self.abs_sum /= s
        self.samples = [x / s.cpu() for x in self.samples]


def _awq_scale(second_moment: torch.Tensor, x_mean: torch.Tensor, weights: list[torch.Tensor], grid: Grid, steps: int) -> torch.Tensor:
    """The candidate scale whose RTN-quantized linears best reproduce their float outputs.

    The output error of a weight error D [O, I] over all calibration inputs is
    E||x D^T||^2 = sum((D @ M) * D) with M = E[x x^T] [I, I]: every token counts, and no
    [tokens, O] output is ever built.
    """
    w = torch.cat([t.float() for t in weights])  # [sum O, I]
    m = second_moment.float()

    def loss(wq: torch.Tensor) -> float:
        d = w - wq
        return float(((d @ m) * d).sum()) / w.shape[0]

    best, best_loss = torch.ones(w.shape[1]), loss(fake_quantize(w, grid))
    for s in awq_candidates(x_mean, normalized_weight_mean(weights, grid.group_size), steps):
        if (err := loss(fake_quantize(w * s, grid) / s)) < best_loss:
            best, best_loss = s, err
    return best


SQ_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
SQ_ROWS = 256  # calibration rows per chunk of the alpha search


def _smoothquant_scale(x: torch.Tensor, weights: list[torch.Tensor], grid: Grid, act: str | None) -> torch.Tensor:
    """SmoothQuant scales for the alpha (or none) whose quantized weights and activations
    best reproduce the float outputs on the calibration rows."""
    absmax = x.abs().amax(0)
    w = torch.cat([t.float() for t in weights])  # [sum O, I]

    def loss(s: torch.Tensor) -> float:  # over row chunks: no [tokens, O] products held at once
        wq = fake_quantize(w * s, grid).T
        sse = sum(float((xc @ w.T - fake_quantize_tokens(xc / s, act) @ wq).pow(2).sum()) for xc in x.split(SQ_ROWS))
        return sse / (x.shape[0] * w.shape[0])

    best, best_loss = torch.ones(w.shape[1]), loss(torch.ones(w.shape[1]))
    for a in SQ_ALPHAS:
        s = smoothquant_scales(absmax, weights, a)
        if (err := loss(s)) < best_loss:
            best, best_loss = s, err
    return best


def _quantize_together(lins: list[torch.nn.Linear], st: InputStats, grid: Grid, opts: Options) -> list[QuantizedWeight]:
    """Quantize linears that read the same input (q/k/v, gate/up) as one stacked weight:
    GPTQ and the range search treat rows independently, so this is exact, and one
    Hessian factorization and one column sweep serve them all. Runs on the layer's device;
    the integers and scales are kept on the CPU."""
    dtype = lins[0].weight.dtype
    w = torch.cat([lin.weight for lin in lins]) if len(lins) > 1 else lins[0].weight  # [sum O, I]
    if opts.uses_gptq:
        keep = w != 0 if opts.keep_zeros else None
        q, scale, zp = gptq(w, st.hessian.H, grid, dtype, opts.block_size, opts.dampening, opts.actorder, opts.range_search, keep)
    else:
        w = w.float()
        scale, zp = search_range(w, grid, dtype, importance=st.mean_square()) if opts.range_search else compute_qparams(w, grid, dtype)
        q = quantize(w, scale, zp, grid)
    out, row = [], 0
    for lin in lins:
        rows = slice(row, row + lin.out_features)
        row += lin.out_features
        lin.weight.data = dequantize(q[rows], scale[rows], zp[rows]).to(dtype)
        out.append(QuantizedWeight(q[rows].cpu(), scale[rows].cpu(), zp[rows].cpu()))
    heap.trim()  # the temporaries' pages go back before the next group's are taken
    return out


def _rtn_error(layer: torch.nn.Module, targets: dict[str, torch.nn.Linear], grid: Grid, inputs: calibrate.LayerInputs, ref: list[torch.Tensor]) -> float:
    """Output error of this layer with plain min/max RTN (the baseline the method improves on)."""
    saved = {n: m.weight.data.clone() for n, m in targets.items()}
    for m in targets.values():
        m.weight.data = fake_quantize(m.weight.float(), grid).to(m.weight.dtype)
    err = calibrate.relative_error(ref, calibrate.run_layer(layer, _head(inputs, len(ref))))
    for n, m in targets.items():
        m.weight.data = saved[n]
    return err


def _head(inputs: calibrate.LayerInputs, n: int) -> calibrate.LayerInputs:
    return calibrate.LayerInputs(inputs.hidden[:n], inputs.kwargs[:n])


def apply(
    model: torch.nn.Module,
    layers: dict[str, torch.nn.Linear],
    grid: Grid,
    batches: list[torch.Tensor],
    opts: Options,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
    sink: Callable[[dict[str, QuantizedWeight]], None] | None = None,
    store: calibrate.LayerStore | None = None,
) -> tuple[dict[str, QuantizedWeight], list[dict]]:
    """Quantize `layers` (full names) layer by layer. Each decoder layer's weights go to `sink`
    once its quantized outputs are computed (none given: they are collected and returned);
    `store` loads and releases the layers (default: all in memory).
    Returns the collected weights and, per decoder layer, the relative output error of plain
    RTN and of the method."""
    blocks = calibrate.decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    results: dict[str, QuantizedWeight] = {}
    sink = sink or results.update
    pending: dict[int, dict[str, QuantizedWeight]] = {}  # layer -> weights not yet sunk
    done: set[str] = set()
    report: list[dict] = []
    n_tokens = sum(b.numel() for b in batches)
    n_err = next((k + 1 for k in range(len(batches)) if sum(b.numel() for b in batches[: k + 1]) >= ERROR_TOKENS), len(batches))

    def calibrate_layer(i: int, layer: torch.nn.Module, inputs: calibrate.LayerInputs) -> None:
        own = f"{prefix}.{i}."
        targets = {n[len(own):]: m for n, m in layers.items() if n.startswith(own)}
        maps: list[Smooth] = smooth_maps(model, layer) if opts.method != "gptq" else []
        alpha_search = opts.method.startswith("smoothquant") and opts.alpha is None
        heads = {m.linears[0] for m in maps} if alpha_search else set()
        keep = -(-opts.search_tokens * batches[0].numel() // n_tokens) if heads else 0  # rows per batch
        second_moments = opts.uses_gptq or opts.method == "awq"
        stats = {
            n: InputStats(Hessian(m.in_features, device) if second_moments else None,
                          *(torch.zeros(m.in_features, device=device) for _ in range(3)))
            for n, m in targets.items()
        }
        shared = calibrate.SharedReaders()  # q/k/v, gate/up: one set of statistics each
        order: list[str] = []  # targets in the order the first batch reached them
        batch = [-1]

        def observe(name: str, x: torch.Tensor) -> None:
            owner = shared.reader(name, x)
            if owner == name:
                stats[name].add(x, keep if name in heads else 0)
            else:
                stats[name] = stats[owner]
            if batch[0] == 0:
                order.append(name)
            elif batch[0] >= n_err and name == order[-1]:
                raise calibrate.StopLayer  # the rest of the layer only matters for `ref`

        def next_batch(mod, args) -> None:
            shared.next_batch()
            batch[0] += 1

        hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: observe(n, args[0])) for n, m in targets.items()]
        hooks.append(layer.register_forward_pre_hook(next_batch))
        ref = calibrate.run_layer(layer, inputs)[:n_err]
        for h in hooks:
            h.remove()
        rtn_err = _rtn_error(layer, targets, grid, inputs, ref)

        for m in maps:
            if not all(n in targets for n in m.linears):
                continue  # a linear the user kept dense: leave this pair alone
            lins = [targets[n] for n in m.linears]
            if opts.method == "awq":
                st = stats[m.linears[0]]
                s = _awq_scale(st.hessian.H.cpu() / 2, st.mean_abs().cpu(), [lin.weight.cpu() for lin in lins], grid, opts.awq_grid)
            elif opts.alpha is None:
                s = _smoothquant_scale(torch.cat(stats[m.linears[0]].samples), [lin.weight.cpu() for lin in lins], grid, opts.act)
            else:
                s = smoothquant_scales(stats[m.linears[0]].absmax.cpu(), [lin.weight.cpu() for lin in lins], opts.alpha)
            fold(layer.get_submodule(m.prev), lins, s.to(device))
            for st in {id(stats[n]): stats[n] for n in m.linears}.values():
                st.rescale(s)
        # The groups are independent: for GPTQ two threads overlap one's Python-bound column
        # loop with the other's matrix work. The range search is vectorized already, and in
        # threads its temporaries pile up in the heap (measured: +400 MB on SmolLM2's first layer).
        groups = sorted(shared.groups(targets).values(), key=lambda names: -sum(targets[n].weight.numel() for n in names))
        with ThreadPoolExecutor(QUANT_THREADS if opts.uses_gptq else 1) as pool:
            quantized = pool.map(lambda names: _quantize_together([targets[n] for n in names], stats[names[0]], grid, opts), groups)
            pending[i] = {}
            for names, qws in zip(groups, quantized):
                pending[i].update({own + n: qw for n, qw in zip(names, qws)})
        report.append({"layer": i, "rtn": rtn_err, "method": None})
        refs[i] = ref

    def layer_done(i: int, outputs: list[torch.Tensor]) -> None:
        report[i]["method"] = calibrate.relative_error(refs.pop(i), outputs[:n_err])
        done.update(pending[i])
        sink(pending.pop(i))

    refs: dict[int, list[torch.Tensor]] = {}
    calibrate.layer_by_layer(model, batches, device, calibrate_layer, progress, on_outputs=layer_done, store=store)
    missing = set(layers) - done
    if missing:
        raise RuntimeError(f"layers outside the decoder blocks are not calibrated: {sorted(missing)[:3]}")
    return results, report
