"""lm-eval task accuracy: the shipped task runs offline on a loaded model; unknown names and
encoders are refused before anything runs; the task-drop gate reads the scores."""

from __future__ import annotations

import pytest

from compress.errors import UsageError
from compress.eval import tasks
from compress.recipe import Gates, validate
from compress.report import gates
from compress.report.schema import Measurement, Report, TaskScore
from tests.cli.test_errors import assert_one_line_error, compress


def test_shipped_task_scores_a_tiny_model_offline(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model("llama")
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    (score,) = tasks.run(model, tok, ["everyday_facts"], limit=12).values()
    assert score["samples"] == 12 and 0 <= score["value"] <= 1 and score["stderr"] > 0


def test_unknown_task_is_refused_with_the_names_it_knows():
    with pytest.raises(UsageError, match="unknown task 'no_such_task'.*everyday_facts"):
        tasks.check(["everyday_facts", "no_such_task"], "causal-lm")


def test_cli_refuses_unknown_task_and_encoder_before_running(tiny_model, tmp_path):
    msg = assert_one_line_error(compress("eval", tiny_model("llama"), "--tasks", "nope", "--no-latency"), 2)
    assert "unknown task 'nope'" in msg
    msg = assert_one_line_error(compress("eval", tiny_model("bert"), "--tasks", "everyday_facts"), 2)
    assert "encoder" in msg


def test_task_drop_gate_uses_the_worst_task():
    def m(a: float, b: float) -> Measurement:
        return Measurement(path="x", bytes_on_disk=1, bits_per_weight=None, tasks={
            "a": TaskScore(metric="acc", value=a, stderr=0.05, samples=80),
            "b": TaskScore(metric="acc", value=b, stderr=0.05, samples=80)})  # fmt: skip

    rep = Report(tool="t", created="c", model="m", task="causal-lm", recipe={}, stages=[], base=m(0.60, 0.50),
                 result=m(0.59, 0.45), environment={})  # fmt: skip
    (g,) = gates.check(Gates(max_task_drop=2), rep)
    assert not g.passed and g.value == pytest.approx(5.0) and "on b" in g.shown
    (g,) = gates.check(Gates(max_task_drop=5.5), rep)
    assert g.passed


def test_task_gate_needs_tasks_in_the_recipe():
    with pytest.raises(UsageError, match="max_task_drop needs evaluate.tasks"):
        validate({"model": "m", "stages": [{"stage": "quantize", "scheme": "w8a16"}], "gates": {"max_task_drop": 1}})
