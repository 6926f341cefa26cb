"""Load text. The built-in text ships with Python, so it works offline everywhere.

Built-in split: Python's `pydoc_data.topics` help pages, distinct pages in the order of their
sorted topic names; even-numbered pages are calibration text, odd-numbered pages evaluation
text, so they never overlap.

`licenses`: a second evaluation domain that is neither the help pages nor technical documentation: Debian's
license texts (/usr/share/common-licenses, on every Debian and Ubuntu system), else Python's own LICENSE.txt (always
there, 3,000-odd tokens). It is for evaluation only, so no calibration or training run reads it: the text
compress's defaults were chosen on without ever seeing it.

Several sources joined by `+` (`builtin+generated`) are a mix: equal shares of the windows from each
(compress/data/calibration.py).
"""

from __future__ import annotations

import json
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from compress.data import generated
from compress.errors import CompressError, UsageError

Split = Literal["calibration", "evaluation"]
LICENSES_NAME = "licenses"
LICENSES = Path("/usr/share/common-licenses")


@dataclass(frozen=True)
class Texts:
    texts: list[str]
    description: str


def builtin(split: Split) -> Texts:
    from pydoc_data.topics import topics

    # Several topic names share one page: split the distinct pages, so no page is in both.
    pages = list(dict.fromkeys(topics[k].strip() for k in sorted(topics) if topics[k].strip()))
    texts = pages[0::2] if split == "calibration" else pages[1::2]
    parity = "even" if split == "calibration" else "odd"
    version = platform.python_version()
    desc = f"built-in: Python {version} pydoc_data.topics, {parity}-numbered distinct pages ({len(texts)})"
    return Texts(texts, desc)


def licenses() -> Texts:
    """The license texts, each file cut at blank lines as a .txt file is (sorted by name; links skipped, as
    Debian's GPL -> GPL-3 links repeat a text)."""
    files = sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink()) if LICENSES.is_dir() else []
    if files:
        texts = [t for f in files for t in f.read_text(errors="replace").split("\n\n") if t.strip()]
        return Texts(texts, f"licenses: Debian license texts ({LICENSES}, {len(files)} files)")
    lic = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if not lic.is_file():
        raise UsageError(f"dataset {LICENSES_NAME!r}: neither {LICENSES} nor {lic} exists on this machine")
    return Texts(
        [t for t in lic.read_text(errors="replace").split("\n\n") if t.strip()],
        f"licenses: Python's LICENSE.txt ({lic})",
    )


def parts(dataset: str) -> list[str]:
    """A mix's sources (`builtin+generated`), or [dataset]. A path that exists is one source, even with a +."""
    if "+" not in dataset or Path(dataset).expanduser().exists():
        return [dataset]
    names = [p.strip() for p in dataset.split("+")]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise UsageError(f"dataset {dataset!r}: a mix names each source once, joined by + (builtin+generated)")
    return names


def load(dataset: str, split: Split, text_column: str = "text") -> Texts:
    """`builtin`, `licenses` (evaluation), a local .txt/.jsonl/.parquet file or folder, or a datasets hub name."""
    if dataset == "builtin":
        return builtin(split)
    if len(names := parts(dataset)) > 1:
        if split == "evaluation":
            raise UsageError(f"evaluation reads one text at a time, not the mix {dataset!r}: evaluate on each")
        return _mix(names, text_column)
    if dataset == LICENSES_NAME:
        if split != "evaluation":
            raise UsageError(
                f"dataset {LICENSES_NAME!r} is an evaluation domain that no calibration or training reads; "
                "to calibrate on license texts pass their folder"
            )
        return licenses()
    if dataset == generated.NAME:
        raise UsageError(
            f"dataset {generated.NAME!r} is sampled from the model for calibration and training (quantize, prune, "
            "distill); evaluation reads text from files, the built-in pages or the hub"
        )
    path = Path(dataset).expanduser()
    if path.is_dir() and (path / "dataset_info.json").exists() or path.is_dir() and (path / "state.json").exists():
        texts = _from_saved_dataset(path, text_column)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl", ".parquet"))
        if not files:
            raise UsageError(f"dataset {dataset}: no .txt, .jsonl or .parquet files inside")
        texts = [t for f in files for t in _from_file(f, text_column)]
    elif path.is_file():
        texts = _from_file(path, text_column)
    elif path.suffix or "/" in dataset and Path(dataset).parent.exists():
        raise UsageError(f"dataset not found: {dataset}")
    else:
        texts = _from_hub(dataset, text_column)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise UsageError(f"dataset {dataset} holds no text (column {text_column!r})")
    return Texts(texts, f"{dataset} ({len(texts)} texts)")


def evaluation(dataset: str, also: list[str], text_column: str = "text") -> Texts:
    """The evaluation text, each of `also` loaded too so that a bad name stops before anything is measured (the
    measurement reads them again in its own process)."""
    texts = load(dataset, "evaluation", text_column)
    for other in also:
        load(other, "evaluation", text_column)
    return texts


def _mix(names: list[str], text_column: str) -> Texts:
    """The texts of a mix's file sources (for checking they exist and hold text; calibration.windows takes the
    shares). Generated text has no texts before it is sampled."""
    loaded = [load(n, "calibration", text_column) for n in names if n != generated.NAME]
    texts = [t for x in loaded for t in x.texts]
    return Texts(texts, " + ".join(x.description for x in loaded))


def _from_file(path: Path, column: str) -> list[str]:
    if path.suffix == ".txt":
        return [p for p in path.read_text(errors="replace").split("\n\n")]
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UsageError(f"{path}:{i}: not valid JSON") from None
            if not isinstance(row, dict) or column not in row:
                raise UsageError(f"{path}:{i}: no field {column!r} (use --text-column)")
            rows.append(str(row[column]))
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if column not in table.column_names:
            raise UsageError(f"{path}: no column {column!r}; columns: {', '.join(table.column_names)}")
        return [str(v) for v in table.column(column).to_pylist()]
    raise UsageError(f"{path}: unsupported dataset file (use .txt, .jsonl or .parquet)")


def _from_saved_dataset(path: Path, column: str) -> list[str]:
    from datasets import load_from_disk

    ds = load_from_disk(str(path))
    if hasattr(ds, "keys"):  # a DatasetDict: take its first split
        ds = ds[next(iter(ds.keys()))]
    if column not in ds.column_names:
        raise UsageError(f"{path}: no column {column!r}; columns: {', '.join(ds.column_names)}")
    return [str(v) for v in ds[column]]


def _from_hub(name: str, column: str) -> list[str]:
    """`name`, `name:config` or `name:config:split` from the datasets hub."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise UsageError("hub datasets need the `datasets` package: pip install 'compress[data]'") from None
    repo, config, split = (name.split(":") + [None, None])[:3]
    try:
        ds = load_dataset(repo, config, split=split or "train")
    except Exception as exc:
        raise CompressError(
            f"cannot load dataset {name} from the hub (offline or not found): {str(exc)[:160]}"
        ) from None
    if column not in ds.column_names:
        raise UsageError(f"dataset {name}: no column {column!r}; columns: {', '.join(ds.column_names)}")
    return [str(v) for v in ds[column]]
