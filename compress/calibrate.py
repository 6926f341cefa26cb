"""The one layer-by-layer engine every calibrated method runs on.

The inputs of the first decoder layer are captured once; then each layer in turn is moved
to the compute device, the statistics its linears' inputs need are gathered (once per input
tensor: q/k/v and gate/up share theirs), the method changes the layer's linears, and the
layer's (changed) outputs become the next layer's inputs. Only one layer is on the device at
a time, so peak memory is about one layer plus the calibration activations.

`calibrate_linears` is that loop for methods that treat groups of linears (GPTQ, AWQ,
SmoothQuant, Wanda, SparseGPT); `layer_by_layer` is the bare loop (structured pruning's
importance uses it).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from compress import heap
from compress.errors import CompressError
from compress.models.arch import decoder_layers, decoder_prefix
from compress.models.offload import InMemory, LayerStore
from compress.primitives.hessian import Hessian

ERROR_TOKENS = 2048  # each layer's output error is reported on the first batches holding this many tokens
R = TypeVar("R")


class _Captured(Exception):
    pass


class StopLayer(Exception):
    """Raised by a hook when the rest of a layer's forward pass is not needed."""


class SharedReaders:
    """Which linears of a layer read the very same input tensor (q/k/v, gate/up): the first
    to read it owns the statistics, the others share them. Call `next_batch` from the
    layer's forward pre-hook; tensors are held until then, so identity cannot be confused
    by memory reuse."""

    def __init__(self) -> None:
        self._seen: list[tuple[torch.Tensor, str]] = []
        self.owner: dict[str, str] = {}  # linear -> the linear whose statistics it uses

    def next_batch(self) -> None:
        self._seen.clear()

    def reader(self, name: str, x: torch.Tensor) -> str:
        """The owner of x's statistics as `name` reads it."""
        first = next((n for t, n in self._seen if t is x), None)
        if first is None:
            self._seen.append((x, name))
            first = name
        self.owner.setdefault(name, first)
        return first

    def groups(self, names) -> dict[str, list[str]]:
        """owner -> the linears that share its input (in the order of `names`)."""
        out: dict[str, list[str]] = {}
        for n in names:
            out.setdefault(self.owner.get(n, n), []).append(n)
        return out


@dataclass
class LayerInputs:
    hidden: list[torch.Tensor]  # per batch: [B, T, H]
    kwargs: list[dict] = field(default_factory=list)  # per batch: mask, rotary embeddings, ...
    # per batch [B, T, H]: what this layer of the unchanged model outputs, its inputs being the unchanged
    # model's too (only when the method asked for the float stream: `layer_by_layer(float_stream=True)`)
    reference: list[torch.Tensor] | None = None
    # per batch [B, T, H]: this layer's inputs in the unchanged model (the float stream, as `reference`)
    float_inputs: list[torch.Tensor] | None = None


def load_cuda_linalg(device: torch.device) -> None:
    """torch loads its CUDA linear algebra (libtorch_cuda_linalg) on the first Cholesky, and two threads making
    that first call at once fail ("lazy wrapper should be called at most once": GPTQ and SparseGPT on an H200,
    torch 2.11): make it here, on the calling thread, before the pool's threads do."""
    if device.type == "cuda":
        torch.linalg.cholesky_ex(torch.ones(1, 1, device=device))


@torch.no_grad()
def capture_inputs(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device) -> LayerInputs:
    """Run the model up to its first layer for every batch and keep that layer's inputs."""
    layers = decoder_layers(model)
    first = layers[0]
    captured = LayerInputs(hidden=[])

    def hook(module, args, kwargs):
        captured.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        captured.kwargs.append(
            {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
        )
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    _move_outside_layers(model, layers, device)
    try:
        for ids in batches:
            try:
                model(ids.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
        _move_outside_layers(model, layers, "cpu")
    return captured


def _move_outside_layers(model: torch.nn.Module, layers: torch.nn.ModuleList, device) -> None:
    """Embeddings, rotary tables and norms go to `device`; the layers stay where they are."""
    layer_params = {id(p) for p in layers.parameters()}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in layer_params:
                p.data = p.data.to(device)
        for name, b in list(module.named_buffers(recurse=False)):
            if not any(b is lb for lb in layers.buffers()):
                module._buffers[name] = b.to(device)


def run_layer(layer: torch.nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
    """The layer's output per batch; a batch a hook stopped with `StopLayer` has none."""
    outs = []
    for h, kwargs in zip(inputs.hidden, inputs.kwargs):
        try:
            out = layer(h, **kwargs)
        except StopLayer:
            continue
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def relative_error(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    num = sum(float((r.float() - g.float()).pow(2).sum()) for r, g in zip(ref, got))
    den = sum(float(r.float().pow(2).sum()) for r in ref)
    return (num / den) ** 0.5 if den else 0.0


@torch.no_grad()
def layer_by_layer(
    model: torch.nn.Module,
    batches: list[torch.Tensor],
    device: torch.device,
    calibrate: Callable[[int, torch.nn.Module, LayerInputs], None],
    progress: Callable[[int, int], None] | None = None,
    on_outputs: Callable[[int, list[torch.Tensor]], None] | None = None,
    store: LayerStore | None = None,
    float_stream: bool = False,
) -> None:
    """For each layer: load it (`store`: in memory, or from disk), move it to `device`, call
    `calibrate(i, layer, inputs)` (which quantizes it in place), feed its outputs (also shown
    to `on_outputs`) to the next layer, and release it.

    float_stream: also carry the unchanged model's hidden states along, each layer run on them
    before it is changed, and hand them to `calibrate` as `inputs.reference` (the target a method
    that tunes against the model's own outputs aims at, rather than the changed layers' outputs)."""
    store = store or InMemory()
    inputs = capture_inputs(model, batches, device)
    floats = list(inputs.hidden) if float_stream else None
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        store.load(i, layer)
        layer.to(device)
        if floats is not None:
            inputs.float_inputs = floats
            floats = inputs.reference = run_layer(layer, LayerInputs(floats, inputs.kwargs))
        calibrate(i, layer, inputs)
        inputs.hidden = run_layer(layer, inputs)
        if on_outputs:
            on_outputs(i, inputs.hidden)
        store.release(i, layer)
        heap.trim()
        if progress:
            progress(i + 1, len(layers))


@dataclass(frozen=True)
class Gather:
    """The input statistics a method reads; the engine collects only these."""

    hessian: bool = False  # sum x x^T (GPTQ, SparseGPT, AWQ's output-error model)
    absolute: bool = False  # per-feature max |x| and sum |x| (smoothing)
    rows: dict[str, int] = field(default_factory=dict)  # linear -> input rows kept over all batches (searches)
    # sum (x_float - x) x^T: how far each linear's inputs drifted from the unchanged model's (GPTAQ); needs the
    # method's `float_stream`
    drift: bool = False


@dataclass
class InputStats:
    """What one linear's inputs looked like during the calibration pass."""

    hessian: Hessian | None
    sq_sum: torch.Tensor  # [I] sum of x^2 (the Hessian's diagonal holds it when there is one)
    absmax: torch.Tensor  # [I] max |x|
    abs_sum: torch.Tensor  # [I] sum |x|
    absolute: bool = True
    n: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)  # a subset of input rows
    drift_sum: torch.Tensor | None = None  # [I, I] sum (x_float - x) x^T (Gather.drift)

    @classmethod
    def empty(cls, features: int, gather: Gather, device: torch.device) -> InputStats:
        zeros = (torch.zeros(features, device=device) for _ in range(3))
        drift = torch.zeros(features, features, device=device) if gather.drift else None
        hessian = Hessian(features, device) if gather.hessian else None
        return cls(hessian, *zeros, absolute=gather.absolute, drift_sum=drift)

    def add(self, x: torch.Tensor, keep: int, x_float: torch.Tensor | None = None) -> None:
        """x: a batch of the linear's inputs; x_float: the same positions' inputs in the unchanged model (drift)."""
        if self.drift_sum is not None:
            xf = x.reshape(-1, x.shape[-1]).float()
            self.drift_sum += (x_float.reshape(-1, x.shape[-1]).float() - xf).T @ xf
        x = x.reshape(-1, x.shape[-1])  # [n, I], in the layer's dtype
        if self.hessian is not None:
            self.hessian.add(x)  # its diagonal is the sum of x^2
        else:
            self.sq_sum += x.float().pow(2).sum(0)
        if self.absolute:
            a = x.abs()
            self.absmax = torch.maximum(self.absmax, a.amax(0).float())
            self.abs_sum += a.sum(0, dtype=torch.float32)
        self.n += x.shape[0]
        if keep:
            idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.n))[:keep]
            self.samples.append(x[idx].float().cpu())

    def finite(self) -> bool:
        held = [self.sq_sum, self.absmax] + ([self.hessian.sum] if self.hessian is not None else [])
        return all(bool(torch.isfinite(t).all()) for t in held)

    def mean_square(self) -> torch.Tensor:
        """[I] E[x^2] per input feature."""
        if self.hessian is not None:
            return self.hessian.H.diagonal() / 2
        return self.sq_sum / max(self.n, 1)

    @property
    def drift(self) -> torch.Tensor:
        """[I, I] 2/n sum (x_float - x) x^T, on the Hessian's scale."""
        return self.drift_sum * (2.0 / max(self.n, 1))

    def mean_abs(self) -> torch.Tensor:
        """[I] E|x| per input feature."""
        return self.abs_sum / max(self.n, 1)

    def rescale(self, s: torch.Tensor) -> None:
        """Inputs became x / s after a fold."""
        s = s.to(self.sq_sum.device)
        if self.hessian is not None:
            self.hessian.rescale(s)
        if self.drift_sum is not None:
            self.drift_sum /= s[:, None] * s[None, :]
        self.sq_sum /= s.pow(2)
        self.absmax /= s
        self.abs_sum /= s
        self.samples = [x / s.cpu() for x in self.samples]


@dataclass
class Layer:
    """One decoder layer as the engine hands it to a method."""

    index: int
    module: torch.nn.Module
    targets: dict[str, torch.nn.Linear]  # names relative to the layer
    stats: dict[str, InputStats]  # per linear; linears that read one tensor share one object


@dataclass(frozen=True)
class LayerError:
    """Relative output error of one decoder layer: with plain RTN (quantization's baseline)
    and with the method, on the first batches holding ERROR_TOKENS tokens."""

    layer: int
    method: float
    rtn: float | None = None


def head(inputs: LayerInputs, n: int) -> LayerInputs:
    reference = None if inputs.reference is None else inputs.reference[:n]
    floats = None if inputs.float_inputs is None else inputs.float_inputs[:n]
    return LayerInputs(inputs.hidden[:n], inputs.kwargs[:n], reference, floats)


@torch.no_grad()
def calibrate_linears(
    model: torch.nn.Module,
    linears: dict[str, torch.nn.Linear],
    batches: list[torch.Tensor],
    device: torch.device,
    *,
    gather: Callable[[torch.nn.Module, dict[str, torch.nn.Linear]], Gather],
    treat: Callable[[list[torch.nn.Linear], InputStats], list[R]],
    threads: int = 1,
    prepare: Callable[[Layer], None] | None = None,
    treat_layer: Callable[[Layer, LayerInputs], dict[str, R] | None] | None = None,
    baseline: Callable[[torch.nn.Module, dict[str, torch.nn.Linear], LayerInputs, list[torch.Tensor]], float]
    | None = None,
    sink: Callable[[dict[str, R]], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    store: LayerStore | None = None,
    float_stream: bool = False,
) -> list[LayerError]:
    """Change `linears` (full names) layer by layer, each layer seeing the inputs the already
    changed layers produce.

    Per decoder layer: `gather(layer, targets)` says which statistics to collect; one pass over
    the calibration batches collects them (and the layer's float outputs, for the error);
    `baseline` measures the error of the method's baseline; `prepare` changes the layer as a
    whole (smoothing folds); `treat_layer(layer, inputs)` may change all its linears at once
    (tuned rounding against the layer's outputs) and return a result per linear name, else
    `treat(linears, stats)` changes each group of linears that read one input and returns one
    result per linear, in `threads` threads (groups are independent); once the layer's new
    outputs are computed, its results go to `sink` (in-place when none). `float_stream`: see
    `layer_by_layer`.
    """
    prefix = decoder_prefix(model)
    n_err = next(
        (k + 1 for k in range(len(batches)) if sum(b.numel() for b in batches[: k + 1]) >= ERROR_TOKENS), len(batches)
    )
    n_tokens = sum(b.numel() for b in batches)
    errors: list[LayerError] = []
    refs: dict[int, tuple[list[torch.Tensor], float | None]] = {}
    pending: dict[int, dict[str, R]] = {}
    done: set[str] = set()

    def calibrate(i: int, module: torch.nn.Module, inputs: LayerInputs) -> None:
        own = f"{prefix}.{i}."
        targets = {n[len(own) :]: m for n, m in linears.items() if n.startswith(own)}
        want = gather(module, targets)
        stats = {n: InputStats.empty(m.in_features, want, device) for n, m in targets.items()}
        keep = {n: -(-rows * batches[0].numel() // n_tokens) for n, rows in want.rows.items()}  # rows per batch
        shared = SharedReaders()
        order: list[str] = []  # targets in the order the first batch reached them
        batch = [-1]
        floating, float_x = [False], {}  # drift: the float stream's pass over this batch, and its linear inputs

        def observe(name: str, x: torch.Tensor) -> None:
            if floating[0]:
                float_x[name] = x
                return
            owner = shared.reader(name, x)
            if owner == name:
                stats[name].add(x, keep.get(name, 0), float_x.get(name))
            else:
                stats[name] = stats[owner]
            if batch[0] == 0:
                order.append(name)
            elif batch[0] >= n_err and name == order[-1]:
                raise StopLayer  # the rest of the layer only matters for the reference outputs

        def next_batch(mod, args, kwargs) -> None:
            if floating[0]:
                return
            shared.next_batch()
            batch[0] += 1
            if want.drift:  # the same batch through the unchanged model's inputs first: each linear's float input
                floating[0] = True
                try:
                    mod(inputs.float_inputs[batch[0]], **kwargs)
                finally:
                    floating[0] = False

        hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: observe(n, args[0])) for n, m in targets.items()]
        hooks.append(module.register_forward_pre_hook(next_batch, with_kwargs=True))
        try:
            ref = run_layer(module, inputs)[:n_err]
        finally:
            for h in hooks:
                h.remove()
        for name, st in stats.items():
            if not st.finite():
                raise CompressError(
                    f"{prefix}.{i}.{name}: its inputs on the calibration text hold non-finite values (NaN or "
                    "infinity); the layers before it overflow in this dtype (try --dtype float32)"
                )
        refs[i] = (ref, baseline(module, targets, head(inputs, len(ref)), ref) if baseline else None)
        layer = Layer(i, module, targets, stats)
        if prepare:
            prepare(layer)
        if treat_layer and (by_name := treat_layer(layer, inputs)) is not None:
            pending[i] = {own + n: r for n, r in by_name.items()}
            return
        groups = sorted(
            shared.groups(targets).values(), key=lambda names: -sum(targets[n].weight.numel() for n in names)
        )

        def one(names: list[str]) -> list[R]:
            return treat([targets[n] for n in names], stats[names[0]])

        # torch ops run from a pool thread while the caller waits are 4-7x slower (each thread its own
        # OpenMP team, two teams on 2 cores: AWQ's rounding 49 s -> 11 s on SmolLM2): one thread is this one.
        if threads == 1:
            results = [one(names) for names in groups]
        else:
            with ThreadPoolExecutor(threads) as pool:
                results = list(pool.map(one, groups))
        pending[i] = {own + n: r for names, rs in zip(groups, results) for n, r in zip(names, rs)}

    def finished(i: int, outputs: list[torch.Tensor]) -> None:
        ref, rtn = refs.pop(i)
        errors.append(LayerError(i, relative_error(ref, outputs[:n_err]), rtn))
        done.update(pending[i])
        if sink:
            sink(pending[i])
        del pending[i]

    if threads > 1:
        load_cuda_linalg(device)
    layer_by_layer(
        model, batches, device, calibrate, progress, on_outputs=finished, store=store, float_stream=float_stream
    )
    missing = set(linears) - done
    if missing:
        raise RuntimeError(f"linears outside the decoder blocks are not calibrated: {sorted(missing)[:3]}")
    return errors
