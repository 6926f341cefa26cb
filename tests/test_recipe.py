from pathlib import Path

import pytest
import yaml

from compress.errors import UsageError
from compress.recipe import Recipe, apply_overrides, load

GOOD = """\
model: smollm2-135m
output: out
stages:
  - stage: quantize
    scheme: w4a16
    group_size: 64
evaluate:
  max_tokens: 4096
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_good_recipe_round_trips(tmp_path):
    r = load(write(tmp_path, GOOD))
    assert r.stages[0].scheme == "w4a16" and r.stages[0].group_size == 64 and r.evaluate.max_tokens == 4096
    again = Recipe.model_validate(yaml.safe_load(r.to_yaml()) | {"output": "out"})
    assert again == r


def test_typo_names_field_and_line(tmp_path):
    with pytest.raises(UsageError) as exc:
        load(write(tmp_path, GOOD.replace("group_size: 64", "grop_size: 64")))
    assert "r.yaml:6" in str(exc.value) and "stages.0.grop_size" in str(exc.value)


def test_bad_value_names_field_and_line(tmp_path):
    with pytest.raises(UsageError) as exc:
        load(write(tmp_path, GOOD.replace("scheme: w4a16", "scheme: w7a16")))
    assert "r.yaml:5" in str(exc.value) and "stages.0.scheme" in str(exc.value)
    assert "method" not in str(exc.value)  # none was given: the scheme's error alone, not one about its default
    with pytest.raises(UsageError) as exc:
        load(write(tmp_path, GOOD.replace("scheme: w4a16", "scheme: w7a16\n    method: rtm")))
    assert "stages.0.scheme" in str(exc.value) and "stages.0.method" in str(exc.value)  # both given, both wrong


def test_wrong_type(tmp_path):
    with pytest.raises(UsageError, match="evaluate.max_tokens"):
        load(write(tmp_path, GOOD.replace("max_tokens: 4096", "max_tokens: lots")))


def test_invalid_yaml_names_line(tmp_path):
    with pytest.raises(UsageError, match=r"r.yaml:\d+: not valid YAML"):
        load(write(tmp_path, "model: [unclosed\nstages: 1\n"))


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load(tmp_path / "none.yaml")


def test_set_overrides(tmp_path):
    r = load(write(tmp_path, GOOD), ["stages.0.scheme=w8a8", "stages.0.group_size=channel", "evaluate.latency=false"])
    assert r.stages[0].scheme == "w8a8" and r.stages[0].group_size == "channel" and r.evaluate.latency is False
    with pytest.raises(UsageError, match="no list item"):
        apply_overrides({"stages": []}, ["stages.3.scheme=w8a8"])
    with pytest.raises(UsageError, match="KEY=VALUE"):
        apply_overrides({}, ["stages"])


PRUNE = """\
model: smollm2-135m
stages:
  - stage: prune
    method: sparsegpt
    pattern: "2:4"
  - stage: quantize
    scheme: w4a16
"""


def test_prune_stage_parses_and_round_trips(tmp_path):
    r = load(write(tmp_path, PRUNE))
    assert r.stages[0].stage == "prune" and r.stages[0].pattern == "2:4" and r.stages[1].stage == "quantize"
    assert Recipe.model_validate(yaml.safe_load(r.to_yaml())) == r


@pytest.mark.parametrize(
    "change,needle",
    [
        (("method: sparsegpt", "method: sparsegpt\n    sparsty: 0.5"), "r.yaml:5: stages.0.sparsty"),
        (('pattern: "2:4"', 'pattern: "4:2"'), "0 < N < M"),
        (('pattern: "2:4"', "sparsity: 1.5"), "stages.0.sparsity"),
        (("method: sparsegpt", "method: sparsegpt\n    mlp_keep: 0.5"), "belong to method structured"),
    ],
)
def test_prune_stage_errors_name_the_field(tmp_path, change, needle):
    with pytest.raises(UsageError) as exc:
        load(write(tmp_path, PRUNE.replace(*change)))
    assert needle in str(exc.value)


DISTILL = """\
model: m
stages:
  - stage: prune
    method: structured
    drop_layers: 2
  - stage: distill
    steps: 10
"""


def test_distill_stage_parses_and_round_trips(tmp_path):
    r = load(write(tmp_path, DISTILL))
    d = r.stages[1]
    assert d.stage == "distill" and d.teacher is None and d.steps == 10 and d.loss == "kl"
    assert Recipe.model_validate(yaml.safe_load(r.to_yaml())) == r


@pytest.mark.parametrize("written, read", [("off", "off"), ("on", "bf16"), ("'off'", "off"), ("bf16", "bf16")])
def test_distill_autocast_reads_yaml_booleans(tmp_path, written, read):
    """YAML reads an unquoted off as false: the recipe still means the option, not a type error."""
    r = load(write(tmp_path, DISTILL.replace("steps: 10", f"steps: 10\n    autocast: {written}")))
    assert r.stages[1].autocast == read


@pytest.mark.parametrize(
    "change,needle",
    [
        (("steps: 10", "steps: 10\n    tokens: 100"), "steps or tokens"),
        (("steps: 10", "steps: 0"), "r.yaml:7: stages.1.steps"),
        (("steps: 10", "stepz: 10"), "stages.1.stepz"),
        (("steps: 10", "loss: kl-div"), "stages.1.loss"),
        (("steps: 10", "kd_weight: 0\n    lm_weight: 0"), "nothing to train"),
    ],
)
def test_distill_stage_errors_name_the_field(tmp_path, change, needle):
    with pytest.raises(UsageError) as exc:
        load(write(tmp_path, DISTILL.replace(*change)))
    assert needle in str(exc.value)


def test_distill_after_quantize_is_refused(tmp_path):
    from compress import api

    r = load(
        write(tmp_path, "model: m\noutput: o\nstages:\n  - {stage: quantize, scheme: w8a16}\n  - {stage: distill}\n")
    )
    with pytest.raises(UsageError, match="distill its checkpoint"):
        api._check_stages(r)
