"""Dry-run plans: model facts from headers, sizes after each stage, resources refused up front."""

import json
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


def test_gguf_plan_reads_the_copy_the_run_reads(monkeypatch, tmp_path, smollm2_dir):
    """The built-in GGUF's plan counts bytes as the run stores them (the config's bf16), even when another --dtype's
    float32 copy sits in the cache beside it (it once planned SmolLM2's nf4 output at 165 MiB for 111)."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = sources.resolve("smollm2-135m")
    monkeypatch.setattr(plan, "cache_dir", lambda: tmp_path)
    stem = f"{src.path.stem}-{sources.fingerprint(src.path)}"
    for dtype in ("auto", "float32"):
        d = tmp_path / "gguf" / f"{stem}-{dtype}"
        shutil.copytree(smollm2_dir, d, ignore=shutil.ignore_patterns("*.safetensors"))
        tensors = load_file(next(smollm2_dir.glob("*.safetensors")))
        save_file({k: v.float() if dtype == "float32" else v for k, v in tensors.items()}, d / "model.safetensors")
        if dtype == "float32":  # as models/source.py writes that copy's config
            cfg = json.loads((d / "config.json").read_text())
            cfg.update({k: "float32" for k in ("dtype", "torch_dtype") if k in cfg})
            (d / "config.json").write_text(json.dumps(cfg))
    assert plan.facts(src, "auto").dtype_bytes == 2
    assert plan.facts(src, "float32").dtype_bytes == 4


def test_distill_time_follows_the_autocast_and_the_loss_path(smollm2_dir, tmp_path, monkeypatch):
    """bfloat16 autocast and the fused losses each shorten the estimate by their fitted rates."""
    from compress import recipe

    monkeypatch.setattr(recipe, "half_is_fast", lambda dtype, device: True)
    seconds = {}
    for autocast, loss in [("auto", "kl"), ("off", "kl"), ("off", "jsd")]:
        r = validate(
            {
                "model": str(smollm2_dir),
                "stages": [{"stage": "distill", "steps": 100, "autocast": autocast, "loss": loss}],
            }
        )
        src = sources.Source("smollm2", "dir", smollm2_dir)
        p = plan.make(r, src, [src], tmp_path / "out", gflops=100.0)  # one speed for all three: no probe noise
        seconds[autocast, loss] = p.stages[0].seconds
    bf16, fp32, autograd = seconds["auto", "kl"], seconds["off", "kl"], seconds["off", "jsd"]
    assert bf16 < fp32 < autograd
    # the training dominates 100 steps; the held-out perplexities, the same for all three, are the rest
    assert fp32 / bf16 == pytest.approx(plan.DISTILL_RATE[True] / plan.DISTILL_RATE[False], rel=0.05)
    assert autograd / fp32 == pytest.approx(plan.DISTILL_AUTOGRAD, rel=0.05)
