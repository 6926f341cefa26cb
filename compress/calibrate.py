"""Layer-by-layer calibration: run the model one decoder layer at a time.

The inputs of the first layer are captured once; then each layer in turn is moved to the
compute device, calibrated and quantized by the method's callback, and its (quantized)
outputs become the next layer's inputs. Only one layer is on the device at a time, so peak
memory is about one layer plus the calibration activations, not the whole model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from compress import heap
from compress.errors import UsageError


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


class LayerStore(Protocol):
    """Where decoder layers live between uses (`models.offload.OnDisk` keeps them on disk)."""

    def load(self, i: int, layer: torch.nn.Module) -> None: ...

    def release(self, i: int, layer: torch.nn.Module) -> None: ...

    def save(self, model: torch.nn.Module, dest: Path) -> None: ...


class InMemory:
    """Every layer stays loaded; a layer leaves the compute device when done."""

    def load(self, i: int, layer: torch.nn.Module) -> None:
        pass

    def release(self, i: int, layer: torch.nn.Module) -> None:
        layer.to("cpu")

    def save(self, model: torch.nn.Module, dest: Path) -> None:
        model.save_pretrained(dest)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The repeated blocks of a transformers model (decoder layers, or encoder layers)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "encoder.layer", "bert.encoder.layer"):
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, torch.nn.ModuleList):
            return node
    raise UsageError(f"{type(model).__name__}: no decoder layers found for layer-by-layer calibration")


@torch.no_grad()
def capture_inputs(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device) -> LayerInputs:
    """Run the model up to its first layer for every batch and keep that layer's inputs."""
    layers = decoder_layers(model)
    first = layers[0]
    captured = LayerInputs(hidden=[])

    def hook(module, args, kwargs):
        captured.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        captured.kwargs.append({k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")})
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
) -> None:
    """For each layer: load it (`store`: in memory, or from disk), move it to `device`, call
    `calibrate(i, layer, inputs)` (which quantizes it in place), feed its outputs (also shown
    to `on_outputs`) to the next layer, and release it."""
    store = store or InMemory()
    inputs = capture_inputs(model, batches, device)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        store.load(i, layer)
        layer.to(device)
        calibrate(i, layer, inputs)
        inputs.hidden = run_layer(layer, inputs)
        if on_outputs:
            on_outputs(i, inputs.hidden)
        store.release(i, layer)
        heap.trim()
        if progress:
            progress(i + 1, len(layers))
