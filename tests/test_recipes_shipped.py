"""Every recipe in recipes/ parses, dry-runs, and runs on a tiny model."""

import json
from pathlib import Path

import pytest
import yaml

from compress.recipe import load
from tests.cli.test_errors import compress

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_there_are_recipes_for_the_common_jobs():
    names = {p.stem for p in RECIPES}
    assert {"int4-gptq", "int8-smoothquant", "fp8", "2of4-int4", "drop-distill-int4", "encoder-int8"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_documented_and_parses(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 20  # one line saying what it is for
    r = load(path)
    assert r.gates.any()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_dry_runs(path, tmp_path):
    """In process (the `--dry-run` command itself is covered in tests/cli/test_run.py)."""
    import dataclasses

    from rich.console import Console

    from compress import api, plan as plans

    r = load(path).model_copy(update={"output": str(tmp_path / "out")})
    p = api.run(r, Console(file=open("/dev/null", "w")), dry_run=True)
    plans.check(p)
    plan = {**dataclasses.asdict(p), "peak_bytes": p.peak_bytes}
    assert len(plan["stages"]) == len(yaml.safe_load(path.read_text())["stages"])
    base = plan["base"]
    base_bytes = (base["linear"] + base["embed"] + base["head"] + base["other"]) * base["dtype_bytes"]
    assert 0 < plan["output_bytes"] < 0.75 * base_bytes  # every shipped recipe shrinks the weights
    assert plan["peak_bytes"] > base_bytes and plan["disk_bytes"] >= plan["output_bytes"]
    assert not (tmp_path / "out").exists()


def _tiny_overrides(path: Path, tiny: Path) -> list[str]:
    """Small calibration, short training, one dropped layer, no latency: seconds, not minutes."""
    data = yaml.safe_load(path.read_text())
    sets = [f"model={tiny}", "evaluate.latency=false", "evaluate.max_tokens=256", "gates.min_speedup=null"]
    for i, st in enumerate(data["stages"]):
        if st["stage"] == "distill":
            sets += [f"stages.{i}.steps=2", f"stages.{i}.seq_len=32", f"stages.{i}.batch_size=2"]
        elif st.get("method") not in ("rtn", "magnitude"):
            sets += [f"stages.{i}.samples=4", f"stages.{i}.seq_len=32"]
        if "drop_layers" in st:
            sets.append(f"stages.{i}.drop_layers=1")
    return [a for s in sets for a in ("--set", s)]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_on_a_tiny_model(path, tiny_model, tmp_path):
    tiny = tiny_model("bert" if "encoder" in path.stem else "llama")
    proc = compress("run", path, "-o", tmp_path / "out", *_tiny_overrides(path, tiny), "--json")
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # 1: a gate missed on a random model
    rep = json.loads(proc.stdout)
    assert rep["passed"] is (proc.returncode == 0) and len(rep["gates"]) >= 2
    assert [s["stage"] for s in rep["stages"]] == [s["stage"] for s in yaml.safe_load(path.read_text())["stages"]]
    assert (tmp_path / "out" / "report.md").is_file()
