"""Task accuracy through lm-eval (optional extra `compress[eval]`), on the model as loaded.

Offline, lm-eval runs tasks from a YAML file whose data is a local jsonl (`dataset_path: json`
with `data_files`). compress ships one such task of its own (`everyday_facts`: 80 four-way
questions written for compress) so tests and the demo run anywhere; lm-eval's own tasks
(`hellaswag`, `arc_easy`, ...) work by name where their datasets can be downloaded.
"""

from __future__ import annotations

import functools
import math
import tempfile
from pathlib import Path

import torch

from compress.errors import UsageError

DATA = Path(__file__).resolve().parents[1] / "data" / "tasks"
BUILTIN = {"everyday_facts": "everyday_facts.jsonl"}
EXTRA = "task accuracy needs lm-eval: pip install 'compress[eval]'"

_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


# What `run` imports: the measuring server imports them once before forking a worker that scores tasks.
MODULES = ["lm_eval", "lm_eval.evaluator", "lm_eval.models.huggingface", "lm_eval.tasks"]


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise UsageError(EXTRA) from None
    return lm_eval


def _manager(tmp: Path, lm_eval_tasks: bool):
    """A task index holding compress's built-in tasks (YAML written with the data's path), and lm-eval's
    own when asked: indexing its ~15k task files takes 10.7 s here, so only when a name is not built in."""
    from lm_eval.tasks import TaskManager

    for name, data in BUILTIN.items():
        (tmp / f"{name}.yaml").write_text(_YAML.format(name=name, data=DATA / data))
    return TaskManager(include_path=str(tmp), include_defaults=lm_eval_tasks, verbosity="ERROR")


@functools.cache
def _known() -> frozenset[str]:
    """Every task name lm-eval knows (indexed once a process)."""
    with tempfile.TemporaryDirectory(prefix="compress-tasks-") as tmp:
        return frozenset(_manager(Path(tmp), lm_eval_tasks=True).all_tasks)


def check(names: list[str], model_task: str) -> None:
    """Before anything runs: a causal LM, lm-eval installed and every task name known to it."""
    if not names:
        return
    if model_task != "causal-lm":
        raise UsageError("tasks: lm-eval tasks score causal language models; this model is an encoder")
    _lm_eval()
    unknown = [n for n in names if n not in BUILTIN and n not in _known()]
    if unknown:
        raise UsageError(
            f"unknown task {', '.join(map(repr, unknown))}: compress ships {', '.join(BUILTIN)}; lm-eval's own tasks "
            "(e.g. hellaswag, arc_easy) are named as in `lm-eval --tasks list`"
        )


def run(model: torch.nn.Module, tokenizer, names: list[str], limit: int | None = None) -> dict[str, dict]:
    """{task: {"metric", "value", "stderr", "samples"}}: accuracy (0..1) of each task, zero-shot."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device=str(next(model.parameters()).device))
    with tempfile.TemporaryDirectory(prefix="compress-tasks-") as tmp:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(names),
            task_manager=_manager(Path(tmp), lm_eval_tasks=not set(names) <= set(BUILTIN)),
            limit=limit,
            num_fewshot=0,
            log_samples=False,
            verbosity="ERROR",
        )
    scores = {}
    for name in names:
        res, samples = out["results"][name], out.get("n-samples", {}).get(name, {})
        stderr = res.get("acc_stderr,none")
        scores[name] = {
            "metric": "acc",
            "value": float(res["acc,none"]),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
            "samples": int(samples.get("effective", 0)) or None,
        }
    return scores
