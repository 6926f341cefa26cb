"""Dry-run plans: model facts from headers, sizes after each stage, resources refused up front."""

from dataclasses import replace
from pathlib import Path

import pytest

from compress import plan
from compress.errors import UsageError
from compress.models import source as sources
from compress.recipe import validate

MB = 2**20


def test_facts_of_smollm2_from_headers(smollm2_dir):
    f = plan.facts(sources.Source("smollm2", "dir", smollm2_dir), "auto")
    assert (f.layers, f.hidden, f.intermediate, f.vocab, f.head, f.dtype_bytes) == (30, 576, 1536, 49152, 0, 2)
    assert f.linear == 30 * (576 * (576 + 2 * 192) + 576 * 576 + 3 * 576 * 1536) and f.embed == 49152 * 576
    assert abs(f.bytes_on_disk - sum(p.stat().st_size for p in smollm2_dir.glob("*.safetensors"))) < MB


def _plan(smollm2_dir, stages, tmp_path: Path) -> plan.Plan:
    src = sources.Source("smollm2", "dir", smollm2_dir)
    r = validate({"model": str(smollm2_dir), "stages": stages})
    teachers = [src for s in r.stages if s.stage == "distill"]
    return plan.make(r, src, teachers, tmp_path / "out")


def test_sizes_after_stages(smollm2_dir, tmp_path):
    p = _plan(
        smollm2_dir,
        [
            {"stage": "prune", "method": "structured", "drop_layers": 6, "mlp_keep": 0.75},
            {"stage": "quantize", "scheme": "w4a16", "group_size": 64},
        ],
        tmp_path,
    )
    pruned, quantized = p.stages[0].after, p.stages[1].after
    assert pruned.layers == 24 and pruned.intermediate == 1152
    assert pruned.params / p.base.params == pytest.approx(0.724, abs=0.01)  # measured: 0.724x (benchmarks/RESULTS.md)
    assert quantized.linear_bits == 4 + (16 + 4) / 64 and p.output_bytes < pruned.bytes_on_disk / 2  # zero points
    assert p.disk_bytes >= p.output_bytes + pruned.bytes_on_disk  # the pruned stage is kept for --resume


def test_distill_dominates_the_peak(smollm2_dir, tmp_path):
    p = _plan(smollm2_dir, [{"stage": "distill", "steps": 2}], tmp_path)
    # float32 student, its gradients and AdamW moments, a float32 teacher: at least 16 + 4 bytes a parameter
    assert p.peak_bytes > 20 * p.base.params and p.stages[0].disk_bytes == 16 * p.base.params


def test_a_plan_that_does_not_fit_is_refused(smollm2_dir, tmp_path):
    p = _plan(smollm2_dir, [{"stage": "quantize", "scheme": "w8a16"}], tmp_path)
    plan.check(p)
    with pytest.raises(UsageError, match="not enough disk"):
        plan.check(replace(p, disk_free=p.disk_bytes - 1))
    with pytest.raises(UsageError, match="not enough memory"):
        plan.check(replace(p, memory_available=p.peak_bytes - 1))
