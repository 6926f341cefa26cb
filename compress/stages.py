"""Finished stages kept while a recipe runs, so `--resume` starts after the last one.

Each finished stage (all but the last) is saved as a checkpoint under
`.OUT.partial/stages/<i>-<kind>/` with `stage.json` (its report record and what later stages
need to know); `stage.json` is written last, so its presence marks a whole stage.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from compressed_tensors.compressors import ModelCompressor

from compress.formats import bnb_nf4, sparse
from compress.models.compute import saved_as
from compress.report.schema import StageRecord


@dataclass
class StageResult:
    """What a stage did, besides changing the model in place."""

    record: StageRecord
    changed: list[str]  # the linears it compressed (quantized, pruned, or re-quantized after training)
    # quantized: writes the checkpoint's quantization_config (compressed-tensors', or bitsandbytes' for NF4)
    compressor: ModelCompressor | bnb_nf4.Writer | None = None
    sparsity: dict | None = None  # unstructured pruning: what config.json's compress_sparsity records
    sparse_storage: list[str] = field(default_factory=list)  # linears to write as bitmask + values


@dataclass
class Done:
    """What the stages so far left behind, besides the model."""

    records: list[StageRecord] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)  # compressed linears (size and bits reporting)
    sparsity: dict | None = None  # config.json's compress_sparsity, when the model is sparse
    sparse_storage: list[str] = field(default_factory=list)  # linears to write as bitmask + values

    @property
    def count(self) -> int:
        return len(self.records)


def stage_dir(root: Path, i: int, kind: str) -> Path:
    return root / "stages" / f"{i}-{kind}"


def save(root: Path, i: int, kind: str, loaded, done: Done) -> None:
    dest = stage_dir(root, i, kind)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with saved_as(loaded.model, loaded.dtype):
        loaded.model.save_pretrained(dest)
    loaded.tokenizer.save_pretrained(dest)
    if done.sparsity is not None:
        sparse.record(dest, sparse.carried(done.sparsity) | {"storage": "dense"})
    state = {
        "records": [r.model_dump(mode="json") for r in done.records],
        "layers": done.layers,
        "sparsity": done.sparsity,
        "sparse_storage": done.sparse_storage,
    }
    (dest / "stage.json").write_text(json.dumps(state))
    for older in (root / "stages").glob("*"):  # only the newest is needed to go on
        if older != dest:
            shutil.rmtree(older, ignore_errors=True)


def last(root: Path) -> tuple[Path, Done] | None:
    found = sorted(
        (p for p in (root / "stages").glob("*") if (p / "stage.json").is_file()),
        key=lambda p: int(p.name.split("-")[0]),
    )
    if not found:
        return None
    state = json.loads((found[-1] / "stage.json").read_text())
    done = Done(
        [StageRecord.model_validate(r) for r in state["records"]],
        state["layers"],
        state["sparsity"],
        state["sparse_storage"],
    )
    return found[-1], done
