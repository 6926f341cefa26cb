"""Decoder layers kept on disk (`--offload`), for models larger than memory.

The model is built with empty (meta) decoder layers and everything else loaded. A layer's
weights are read from the checkpoint's safetensors files when its turn comes; once it is
quantized, its compressed tensors go to their own shard of the output and the layer is
emptied again. Peak memory: the weights outside the layers (embeddings, head), one layer,
and the calibration activations.

It is the `LayerStore` used with `--offload`; without it, `InMemory`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compress.errors import UsageError
from compress.models.arch import decoder_layers
from compress.models.compute import kept_in_float32, to_stored
from compress.primitives.qparams import all_finite

INDEX = "model.safetensors.index.json"


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


class Checkpoint:
    """Tensor name -> safetensors file of a checkpoint directory; tensors read on demand."""

    def __init__(self, ckpt: Path):
        self.files: dict[str, Path] = {}
        for f in sorted(ckpt.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                self.files.update(dict.fromkeys(h.keys(), f))

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.files]
        if missing:
            raise UsageError(
                f"--offload: the checkpoint has no tensor {missing[0]!r} the model needs; run without --offload"
            )
        out = {}
        for f in dict.fromkeys(self.files[n] for n in names):
            with safe_open(str(f), "pt") as h:
                for n in names:
                    if self.files[n] == f:
                        t = h.get_tensor(n)
                        if t.is_floating_point() and not all_finite(t):
                            raise UsageError(f"{n} holds non-finite values (NaN or infinity) in {f.name}")
                        out[n] = t.to(dtype) if t.is_floating_point() else t
        return out


class OnDisk:
    """Reads each decoder layer from the checkpoint, writes it to `out_dir` once quantized."""

    def __init__(self, model: torch.nn.Module, ckpt: Path, dtype: torch.dtype, stored: torch.dtype):
        """dtype: the layers compute in it; stored: they are written in it."""
        self.ckpt, self.dtype, self.stored = Checkpoint(ckpt), dtype, stored
        self.keep = kept_in_float32(model)  # left in float32 when a layer is written
        self.layers = decoder_layers(model)
        self.prefix = next(n for n, m in model.named_modules() if m is self.layers)
        self.out_dir: Path | None = None  # set once the output directory exists
        self.written: dict[str, str] = {}  # tensor -> shard file
        self.nbytes = 0

    def missing(self, model: torch.nn.Module) -> list[str]:
        """Parameters of the model the checkpoint does not hold (checked before anything runs)."""
        model.tie_weights()  # a tied output layer shares the embedding's tensor
        return [n for n, _ in model.named_parameters() if n not in self.ckpt.files]

    def load_outside_layers(self, model: torch.nn.Module) -> None:
        names = [k for k in model.state_dict() if not k.startswith(self.prefix + ".") and k in self.ckpt.files]
        model.load_state_dict(self.ckpt.read(names, self.dtype), strict=False, assign=True)
        model.tie_weights()
        empty = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(self.prefix + ".")]
        if empty:
            raise UsageError(
                f"--offload: the checkpoint has no tensor {empty[0]!r} the model needs; run without --offload"
            )

    def load(self, i: int, layer: torch.nn.Module) -> None:
        own = f"{self.prefix}.{i}."
        tensors = self.ckpt.read([own + k for k in layer.state_dict()], self.dtype)
        layer.load_state_dict({k[len(own) :]: v for k, v in tensors.items()}, strict=True, assign=True)

    def release(self, i: int, layer: torch.nn.Module) -> None:
        if self.out_dir is None:
            raise RuntimeError("OnDisk.release before the output directory exists")
        name = f"model-layer-{i:05d}.safetensors"
        own = f"{self.prefix}.{i}."
        to_stored(layer, self.stored, self.keep)
        tensors = {own + k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
        save_file(tensors, str(self.out_dir / name), metadata={"format": "pt"})
        self.written.update(dict.fromkeys(tensors, name))
        self.nbytes += sum(t.nbytes for t in tensors.values())
        layer.to("meta")  # frees the layer

    def save(self, model: torch.nn.Module, dest: Path) -> None:
        """Everything outside the layers through save_pretrained (config, generation config,
        tied weights), then one index over all shards."""
        if len(set(self.written.values())) != len(self.layers):
            raise RuntimeError(
                f"--offload: {len(set(self.written.values()))} of {len(self.layers)} layers were written"
            )
        rest = {k: v for k, v in model.state_dict().items() if not k.startswith(self.prefix + ".")}
        model.save_pretrained(dest, state_dict=rest)
        if not (dest / INDEX).is_file():  # one file: give it a shard's name
            (dest / "model.safetensors").rename(dest / "model-rest.safetensors")
        weight_map, total = dict(self.written), self.nbytes
        for f in {*dest.glob("model-*.safetensors")} - {dest / n for n in self.written.values()}:
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    weight_map[k] = f.name
                    total += h.get_tensor(k).nbytes
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dest / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def empty_model(cls, config, dtype: torch.dtype, trust_remote_code: bool) -> torch.nn.Module:
    """The model with every parameter on the meta device (no memory); buffers are real."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
