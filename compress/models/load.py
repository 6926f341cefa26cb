"""Load a checkpoint into transformers, safely, and say what kind of model it is."""

from __future__ import annotations

import json
import logging
import shutil
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationConfig

from compress import heap
from compress.errors import CompressError, UsageError
from compress.formats import atomic, sparse
from compress.formats.compressed_tensors import read_grids
from compress.formats.stored import read
from compress.models.compute import DTYPES, compute_dtype, float32_bytes, stored_dtype
from compress.models.experts import fused_modules, in_memory, unfuse
from compress.models.offload import InMemory, OnDisk, empty_model
from compress.models.source import Source, cache_dir, fingerprint
from compress.primitives.qparams import GridParams, all_finite

log = logging.getLogger("compress")
# Files sentence-transformers needs beside the weights; save_pretrained does not write them.
SIDECAR_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling")


@dataclass(frozen=True)
class Quantized:
    """How a compressed-tensors checkpoint that was loaded de-quantized is quantized."""

    config: QuantizationConfig
    grids: dict[str, GridParams]  # linear name -> its grid, scales and zero points


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    task: str  # "causal-lm" or "encoder"
    checkpoint: Path  # the Hugging Face directory the weights came from
    layers: InMemory | OnDisk = field(default_factory=InMemory)  # where decoder layers live between uses
    # A compressed-tensors input loaded de-quantized (quantized=True): its config and grids.
    quantized: Quantized | None = None
    # The dtype the result is stored in (scales included); the model may compute in float32 (`models.compute`).
    dtype: torch.dtype = torch.float32


def task_of(architectures: list[str] | None) -> str:
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures or []):
        return "causal-lm"
    return "encoder"


def resolve_dtype(name: str, config: object) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    return stored_dtype(config)


def check_safetensors(path: Path) -> None:
    """Header and length check: a truncated or corrupt file is refused before loading."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header length past end of file")
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not a valid safetensors file ({exc})") from None
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise UsageError(f"{path} is truncated: {size} bytes, its header needs {expected}")


def check_weights(ckpt: Path) -> None:
    for f in sorted(ckpt.glob("*.safetensors")):
        check_safetensors(f)


def materialize_gguf(gguf: Path, dtype: str) -> Path:
    """De-quantize a .gguf through transformers into a cached Hugging Face checkpoint."""
    dest = cache_dir() / "gguf" / f"{gguf.stem}-{fingerprint(gguf)}-{dtype}"
    if (dest / "config.json").is_file():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:
        raise UsageError(f"cannot read {gguf} as a GGUF model: {_first_line(exc)}") from None
    # The GGUF loader marks the model as GGUF-quantized; the de-quantized copy is plain.
    model.hf_quantizer = None
    model.config.quantization_config = None
    del model.config.quantization_config
    model = model.to(DTYPES.get(dtype, torch.bfloat16))  # SmolLM2 and most GGUF sources train in bf16
    tmp = atomic.private_dir(dest)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return atomic.publish(tmp, dest)


def checkpoint_dir(source: Source, dtype: str) -> Path:
    """A Hugging Face directory transformers loads: GGUF de-quantized, sparse storage densified
    (both cached)."""
    if source.is_gguf:
        return materialize_gguf(source.path, dtype)
    if sparse.is_sparse(source.path):
        dest = cache_dir() / "dense" / f"{source.path.name}-{fingerprint(source.path)}"
        return dest if (dest / "config.json").is_file() else sparse.densify(source.path, dest)
    return source.path


def check_device(device: str) -> None:
    """A --device value torch can use here (one-line usage errors otherwise)."""
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible to torch")


def load(
    source: Source,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    offload: bool = False,
    quantized: bool = False,
) -> Loaded:
    """offload: build the decoder layers empty; each is read from disk when its turn comes
    (see `offload.OnDisk`). quantized: accept a compressed-tensors checkpoint written by
    compress, loaded with de-quantized weights, its grids kept in `Loaded.quantized`."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    ckpt = checkpoint_dir(source, dtype)
    if trust_remote_code:
        warnings.warn(f"--trust-remote-code: running Python code shipped with {source.spec}", stacklevel=2)
    try:
        config = AutoConfig.from_pretrained(ckpt, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise UsageError(f"unsupported architecture in {ckpt}: {_first_line(exc)}") from None
    qc = getattr(config, "quantization_config", None)
    grids, extra = None, {}
    if qc and quantized and not offload:
        from transformers import CompressedTensorsConfig

        grids = read_grids(ckpt)
        extra["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
    elif qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        raise UsageError(f"{source.spec} is already quantized ({method}); start from the original checkpoint")
    check_weights(ckpt)
    task = task_of(getattr(config, "architectures", None))
    cls = AutoModelForCausalLM if task == "causal-lm" else AutoModel
    check_device(device)
    if offload and not any(ckpt.glob("*.safetensors")):
        raise UsageError(f"--offload reads layers from safetensors files; {ckpt} has none")
    stored = resolve_dtype(dtype, config)
    bound = 0 if offload else float32_bytes(ckpt, qc if isinstance(qc, dict) else None)  # --offload: a layer at a time
    computed = compute_dtype(stored, device, bound)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=trust_remote_code)
        if offload:
            model = empty_model(cls, config, computed, trust_remote_code)
            if fused_modules(model):  # their checkpoint names are per expert, the model's fused
                raise UsageError(f"{source.spec}: --offload does not read mixture-of-experts layers yet; drop it")
            layers = OnDisk(model, ckpt, computed, stored)
            check_coverage(source.spec, {"missing_keys": layers.missing(model)})
            layers.load_outside_layers(model)
            return Loaded(model.eval(), tokenizer, task, ckpt, layers, dtype=stored)  # moved to the device part by part
        model, info = cls.from_pretrained(
            ckpt,
            dtype=computed,
            use_safetensors=not allow_pickle,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below, by name
            **extra,
        )
        check_coverage(source.spec, info)
        if grids:  # a plain model from here on; saving quantizes it again
            from compressed_tensors.offload import remove_dispatch

            # Under transformers 5.17 compressed-tensors keeps each decompressed module's tensors in a CPU offload
            # cache that `model.to(device)` leaves behind (seen on an H200: `compress bench --device cuda` ran its
            # fp8 kernels on CPU); plain tensors, as transformers 5.25 leaves them.
            remove_dispatch(model)
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            unfuse(model)  # quantized experts are per-expert linears, as their grids name them
            names = in_memory(model, list(grids[1]))  # Mixtral's block_sparse_moe is `mlp` here
            grids = (grids[0], {names[n]: g for n, g in grids[1].items()})
            modules = dict(model.named_modules())
            _exact_experts(model, ckpt, names, computed)
            lost = [n for n in grids[1] if not isinstance(modules.get(n), torch.nn.Linear)]
            if lost:
                raise UsageError(f"{source.spec}: {len(lost)} quantized layers are not linear layers here ({lost[0]})")
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CompressError(f"cannot load {source.spec}: {_first_line(exc)}") from None
    model.eval()
    check_finite(source.spec, model)
    heap.own_weights([*model.parameters(), *model.buffers()])
    return Loaded(model.to(device), tokenizer, task, ckpt, quantized=grids and Quantized(*grids), dtype=stored)


def _exact_experts(model: torch.nn.Module, ckpt: Path, names: dict[str, str], dtype: torch.dtype) -> None:
    """transformers (5.25) de-quantizes fused experts into the checkpoint's dtype (bfloat16) whatever the model's:
    such a linear gets its stored values back, de-quantized in `dtype` as every other linear is."""
    modules = dict(model.named_modules())
    off = {disk for disk, mem in names.items() if getattr(modules.get(mem), "weight", None) is not None
           and modules[mem].weight.dtype != dtype}  # fmt: skip
    if not off:
        return
    for disk, linear in read(ckpt, only=off).items():
        modules[names[disk]].weight = torch.nn.Parameter(linear.dequantized().to(dtype))


def check_coverage(spec: str, info: dict) -> None:
    """Refuse weights that do not cover the config (transformers would fill the gaps with
    random values): a missing tensor, fewer layers than the config says, a shape that differs."""
    missing, mismatched = sorted(info.get("missing_keys") or []), list(info.get("mismatched_keys") or [])
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        names = ", ".join(missing[:3])
        raise UsageError(f"{spec}: the weights lack {len(missing)} tensors the config needs: {names}{more}")
    if mismatched:
        name, *shapes = mismatched[0]
        shown = " vs the config's ".join(str(tuple(s)) for s in shapes)
        raise UsageError(f"{spec}: {name} has shape {shown} ({len(mismatched)} tensors disagree with the config)")


def check_finite(spec: str, model: torch.nn.Module) -> None:
    """Refuse weights holding NaN or infinity: every result computed from them would be garbage."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not all_finite(p):
            raise UsageError(f"{spec}: {name} holds non-finite values (NaN or infinity)")


def copy_sidecars(src: Path, dest: Path) -> None:
    for name in SIDECAR_FILES:
        p = src / name
        if p.is_dir():
            shutil.copytree(p, dest / name)
        elif p.is_file():
            shutil.copy2(p, dest / name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
