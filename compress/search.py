"""`compress search`: the smallest (or fastest) checkpoint that meets a quality budget.

Candidates are scheme x method x group size (and, when asked, sparsity). Each is planned first
(size and time from `plan`, nothing loaded), then run through `api.run` with the same evaluation
and the budget as its gates; the base is measured once (later runs read it back, see
`eval.measure`). The grid is pruned by what is already measured:

- size objective: candidates run smallest first (cheapest first at equal size); once one meets
  the budget, nothing as large is run.
- either objective: storage and kernels depend on scheme, group size and sparsity, not on the
  method; once one method meets the budget there, the others are not run.

The winner becomes OUT, a normal checkpoint whose report lists every candidate considered.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from compress import api, plan
from compress.errors import CompressError, UsageError
from compress.formats.atomic import atomic_dir, check_output
from compress.models import source as sources
from compress.quant.schemes import NF4_GROUPS, SCHEMES, fitting_groups
from compress.recipe import EvalSpec, Gates, validate
from compress.report import html_report, render
from compress.report.schema import Candidate, Report

Objective = Literal["size", "decode"]
QUALITY_GATES = ("max_ppl_increase", "max_kl_divergence", "max_task_drop", "min_embedding_similarity")
# Per candidate, beside its stage: starting a measuring process and loading the model twice
# (~15 s on 2 cores for SmolLM2-135M) and scoring the evaluation text once.
EVAL_OVERHEAD_S = 15.0
# The grid when none is given: the schemes every runtime loads, the methods that read data
# beside the one that does not, and the w4a16 group sizes vLLM's kernels take.
SCHEMES_TRIED = ("w4a16", "w8a16")
METHODS_TRIED = ("rtn", "awq", "gptq")
GROUPS_TRIED = (128, 64, 32)


@dataclass
class Spec:
    """What the user asked: model, output, budget, objective and the grid."""

    model: str
    output: Path
    budget: Gates
    objective: Objective = "size"
    schemes: list[str] = field(default_factory=lambda: list(SCHEMES_TRIED))
    methods: list[str] = field(default_factory=lambda: list(METHODS_TRIED))
    group_sizes: list[int] = field(default_factory=lambda: list(GROUPS_TRIED))
    sparsities: list[float] = field(default_factory=list)  # prune-only candidates (SparseGPT, sparse storage)
    samples: int | None = None  # calibration samples (None: the stage default)
    evaluate: EvalSpec = field(default_factory=EvalSpec)
    overwrite: bool = False
    dtype: str = "auto"
    device: str = "cpu"
    trust_remote_code: bool = False
    allow_pickle: bool = False


@dataclass
class Point:
    """A candidate while the search runs: its recipe stages and what planning it said."""

    label: str
    stages: list[dict[str, Any]]
    storage: tuple  # what decides bytes on disk and kernels: (scheme, group size, sparsity)
    cost: float = 0.0  # stage + measurement seconds, estimated
    bytes: int = 0
    record: Candidate | None = None


@dataclass
class Outcome:
    candidates: list[Candidate]
    report: Report | None  # the winner's (None: nothing met the budget, or a dry run)
    seconds: float


def check_spec(spec: Spec) -> None:
    if not any(getattr(spec.budget, g) is not None for g in QUALITY_GATES):
        raise UsageError(
            "give a quality budget: --max-ppl-increase, --max-kl-divergence, --max-task-drop or "
            "--min-embedding-similarity"
        )
    if spec.budget.max_task_drop is not None and not spec.evaluate.tasks:
        raise UsageError("--max-task-drop needs --tasks (the tasks to score base and candidates on)")
    if spec.objective == "decode" and not spec.evaluate.latency:
        raise UsageError("--objective decode times every candidate; drop --no-latency")
    if not spec.evaluate.enabled:
        raise UsageError("a search measures every candidate; --no-eval does not apply")
    for name in spec.schemes:
        if name not in SCHEMES:
            raise UsageError(f"unknown scheme {name!r}; choose from {', '.join(SCHEMES)}")
    if not spec.schemes and not spec.sparsities:
        raise UsageError("nothing to search: give --schemes or --sparsity")


def _recipe(spec: Spec, stages: list[dict[str, Any]], output: Path):
    return validate(
        {
            "model": spec.model,
            "output": str(output),
            "dtype": spec.dtype,
            "device": spec.device,
            "trust_remote_code": spec.trust_remote_code,
            "allow_pickle": spec.allow_pickle,
            "stages": stages,
            "evaluate": spec.evaluate.model_dump(),
            "gates": spec.budget.model_dump(),
        },
        "search",
    )


def grid(spec: Spec, widths: tuple[int, ...]) -> list[Point]:
    """Every candidate the spec names that this model can take (group sizes must divide every
    layer's input width)."""
    calib = {"samples": spec.samples} if spec.samples else {}
    fits = set(fitting_groups(widths)) if widths else set(spec.group_sizes)
    points = []
    for scheme in spec.schemes:
        kind = SCHEMES[scheme]
        groups: list[int | str] = (
            [g for g in spec.group_sizes if g in fits] if kind.grouped and kind.default_group else ["channel"]
        )
        if kind.grid == "nf4":
            groups = [g for g in groups if g in NF4_GROUPS]
        for g in groups:
            for method in spec.methods:
                stage = {"stage": "quantize", "scheme": scheme, "method": method, "group_size": g, **calib}
                label = f"{scheme} {'g' + str(g) if g != 'channel' else 'channel'} {method}"
                points.append(Point(label, [stage], (scheme, g, 0.0)))
    for s in spec.sparsities:
        stage = {"stage": "prune", "method": "sparsegpt", "sparsity": s, "storage": "sparse", **calib}
        points.append(Point(f"sparsegpt {s:.0%} sparse storage", [stage], ("dense", None, s)))
    return points


def estimate(spec: Spec, points: list[Point], src: sources.Source, dest: Path) -> None:
    """Size on disk and seconds of each candidate, from the plan (nothing is loaded)."""
    gflops = plan.matmul_gflops()
    for p in points:
        pl = plan.make(_recipe(spec, p.stages, dest), src, [], dest, gflops)
        p.bytes = pl.output_bytes
        scored = spec.evaluate.max_tokens if pl.base.task == "causal-lm" else 0
        measure = EVAL_OVERHEAD_S + plan.forward_seconds(pl.base.params, scored, gflops)
        p.cost = sum(s.seconds for s in pl.stages) + measure


def order(points: list[Point], objective: Objective) -> list[Point]:
    """Size: smallest first, cheapest first at equal size. Decode: cheapest first."""
    key = (lambda p: (p.bytes, p.cost)) if objective == "size" else (lambda p: (p.cost, p.bytes))
    return sorted(points, key=key)


def _skip_reason(p: Point, done: list[Point], objective: Objective) -> str | None:
    met = [(i, d) for i, d in enumerate(done, 1) if d.record and d.record.verdict == "met"]
    same = next((i for i, d in met if d.storage == p.storage), None)
    if same is not None:
        return f"#{same} met the budget with the same storage and kernels"
    if objective == "size" and met:
        i, smallest = min(met, key=lambda m: m[1].record.result.bytes_on_disk)
        if p.bytes >= smallest.record.result.bytes_on_disk:
            return f"no smaller than #{i}, which met the budget"
    return None


def _missed(report: Report) -> str:
    return "; ".join(f"{g.name} {g.shown}" for g in report.gates if not g.passed)


def _candidate(p: Point, **kw) -> Candidate:
    return Candidate(label=p.label, stages=p.stages, estimated_bytes=p.bytes, estimated_seconds=p.cost, **kw)


def _quality(c: Candidate) -> float | None:
    """Lower is better: perplexity, or 1 - cosine for encoders."""
    m = c.result
    if m is None:
        return None
    if m.perplexity is not None:
        return m.perplexity.value
    return 1 - m.similarity.mean if m.similarity is not None else None


def front(candidates: list[Candidate]) -> set[int]:
    """Indices of the measured candidates no other one beats on both size and quality."""
    pts = [(i, c.result.bytes_on_disk, _quality(c)) for i, c in enumerate(candidates) if _quality(c) is not None]
    return {
        i for i, b, q in pts if not any((b2 <= b and q2 <= q) and (b2 < b or q2 < q) for j, b2, q2 in pts if j != i)
    }


def winner(candidates: list[Candidate], objective: Objective) -> int | None:
    met = [i for i, c in enumerate(candidates) if c.verdict == "met"]
    if not met:
        return None
    if objective == "size":
        return min(met, key=lambda i: (candidates[i].result.bytes_on_disk, _quality(candidates[i]) or 0))

    # Each candidate's speed is its own interleaved ratio to the base: on a busy machine
    # (noisy), its slowest round pair counts, never a lucky median.
    def decode(i: int) -> float:
        sp = candidates[i].speed
        if sp is None or sp.decode is None:
            return 0.0
        return sp.decode_range[0] if sp.noisy else sp.decode

    return max(met, key=decode)


def run(spec: Spec, console: Console, dry_run: bool = False) -> Outcome:
    """Search; the winner is written to spec.output. When no candidate meets the budget nothing is
    written and `Outcome.report` is None (the caller shows the front and exits 1)."""
    check_spec(spec)
    start = time.perf_counter()
    src = sources.resolve(spec.model, spec.allow_pickle)
    facts = plan.facts(src, spec.dtype)
    if facts.task != "causal-lm" and spec.budget.max_ppl_increase is not None:
        raise UsageError("--max-ppl-increase is for decoders; budget an encoder with --min-embedding-similarity")
    if facts.task != "causal-lm" and spec.budget.max_kl_divergence is not None:
        raise UsageError("--max-kl-divergence is for decoders; budget an encoder with --min-embedding-similarity")
    if facts.task == "causal-lm" and spec.budget.min_embedding_similarity is not None:
        raise UsageError("--min-embedding-similarity is for encoders; budget a decoder with --max-ppl-increase")
    points = grid(spec, facts.widths)
    if not points:
        raise UsageError(f"no candidate fits this model: group sizes {spec.group_sizes} divide none of its layers")
    read = {path for p in points for path in api.read_by(_recipe(spec, p.stages, spec.output), src, [])}
    check_output(spec.output, spec.overwrite, sorted(read))
    estimate(spec, points, src, spec.output)
    points = order(points, spec.objective)
    if dry_run:
        return Outcome([_candidate(p, verdict="planned") for p in points], None, time.perf_counter() - start)
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - closed with the search
    try:
        with atomic_dir(spec.output, spec.overwrite, needed=max(p.bytes for p in points)) as tmp:
            work = tmp / ".candidates"
            for i, p in enumerate(points, 1):
                reason = _skip_reason(p, points[: i - 1], spec.objective)
                if reason:
                    p.record = _candidate(p, verdict="skipped", reason=reason)
                    console.print(f"[{i}/{len(points)}] {p.label}: skipped ({reason})")
                    continue
                console.print(f"[{i}/{len(points)}] {p.label}: running (about {plan.secs(p.cost)})")
                p.record = _try(spec, p, work / f"{i:02d}", quiet)
                console.print(f"[{i}/{len(points)}] {p.label}: {_line(p.record)}")
            candidates = marked([p.record for p in points], spec.objective)
            best = next((i for i, c in enumerate(candidates) if c.winner), None)
            if best is None:
                raise _NoWinner(candidates)
            chosen = work / f"{best + 1:02d}"
            report = Report.model_validate_json((chosen / "report.json").read_text())
            final = str(spec.output)  # the winner was measured where it was built
            candidates[best] = candidates[best].model_copy(
                update={"result": candidates[best].result.model_copy(update={"path": final})}
            )
            report = report.model_copy(
                update={
                    "search": candidates,
                    "recipe": {**report.recipe, "output": final},
                    "result": report.result.model_copy(update={"path": final}),
                }
            )
            for entry in chosen.iterdir():
                os.replace(entry, tmp / entry.name)
            shutil.rmtree(work)
            html_report.write(report, tmp)
    except _NoWinner as none:  # the output directory was never made
        return Outcome(none.candidates, None, time.perf_counter() - start)
    finally:
        quiet.file.close()
    return Outcome(candidates, report, time.perf_counter() - start)


class _NoWinner(Exception):
    def __init__(self, candidates: list[Candidate]):
        super().__init__("no candidate met the budget")
        self.candidates = candidates


def marked(candidates: list[Candidate], objective: Objective) -> list[Candidate]:
    """The candidates with the Pareto front and the winner marked."""
    on_front, best = front(candidates), winner(candidates, objective)
    return [c.model_copy(update={"front": i in on_front, "winner": i == best}) for i, c in enumerate(candidates)]


def _try(spec: Spec, p: Point, out: Path, quiet: Console) -> Candidate:
    t0 = time.perf_counter()
    try:
        report = api.run(_recipe(spec, p.stages, out), quiet)
    except CompressError as exc:  # this candidate cannot run here (a layer, a scheme): the others can
        return _candidate(p, verdict="failed", reason=str(exc), seconds=time.perf_counter() - t0)
    verdict = "met" if report.passed else "missed"
    return _candidate(
        p,
        verdict=verdict,
        reason="" if report.passed else _missed(report),
        result=report.result.model_copy(update={"path": "not kept"}),  # the winner's is set when it is moved
        speed=report.speed,
        seconds=time.perf_counter() - t0,
    )


def _line(c: Candidate) -> str:
    if c.verdict == "failed":
        return f"failed ({c.reason})"
    m = c.result
    tail = "met the budget" if c.verdict == "met" else f"missed: {c.reason}"
    return f"{m.bytes_on_disk / 2**20:,.1f} MiB, {render.quality_text(m)}; {tail}"
