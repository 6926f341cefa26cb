"""Expert pruning on tiny mixtures of experts: the least salient experts go, the router keeps its rows for the
others, and the smaller model reloads in plain transformers (a fresh process)."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from compress.errors import UsageError
from compress.prune.methods import experts
from tests.cli.test_errors import assert_one_line_error, compress
from tests.formats.test_tiny_models import fresh_outputs


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_silent_experts_go_and_the_rest_reload(tiny_model, tmp_path):
    """Experts whose output is zero have REAP saliency 0: with 6 of 8 kept, exactly they go in every layer, the
    kept experts' weights and router rows are the original ones, bit for bit; a Mixtral halved (4 -> 2) and this
    model reload in a fresh process with finite outputs."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model("qwen3_moe"))
    for layer in model.model.layers:
        layer.mlp.experts.down_proj.data[[1, 5]] = 0
    src = tmp_path / "silent"
    model.save_pretrained(src)
    (src / "tokenizer.json").write_bytes((tiny_model("qwen3_moe") / "tokenizer.json").read_bytes())
    (src / "tokenizer_config.json").write_bytes((tiny_model("qwen3_moe") / "tokenizer_config.json").read_bytes())
    out = tmp_path / "pruned"
    common = ["--method", "experts", "--samples", "4", "--seq-len", "64", "--no-eval"]
    proc = compress("prune", src, "-o", out, "--experts-keep", "6", *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert experts.expert_count(AutoConfig.from_pretrained(out))[1] == 6
    report = json.loads((out / "report.json").read_text())
    assert report["stages"][0]["settings"]["dropped_experts"] == {"0": [1, 5], "1": [1, 5]}
    before, after = _tensors(src), _tensors(out)
    kept = [0, 2, 3, 4, 6, 7]
    for i in range(2):
        p = f"model.layers.{i}.mlp"
        assert torch.equal(after[f"{p}.gate.weight"], before[f"{p}.gate.weight"][kept])
        for new, old in enumerate(kept):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                kept_weight = before[f"{p}.experts.{old}.{proj}.weight"]
                assert torch.equal(after[f"{p}.experts.{new}.{proj}.weight"], kept_weight)
        assert f"{p}.experts.6.up_proj.weight" not in after

    halved = tmp_path / "mixtral"
    proc = compress("prune", tiny_model("mixtral"), "-o", halved, "--experts-keep", "0.5", *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert experts.expert_count(AutoConfig.from_pretrained(halved))[1] == 2
    got = fresh_outputs({"moe": {"qwen3": str(out), "mixtral": str(halved)}}, tmp_path)
    assert all(torch.isfinite(t).all() for t in got.values())


def test_refusals(tiny_model, tmp_path):
    """A dense model, fewer experts than the router's top-k, all of them: one line each, nothing written."""
    for src, keep, msg in [
        (tiny_model("llama"), "0.5", "no mixture-of-experts layers"),
        (tiny_model("qwen3_moe"), "1", "keep between 2 and 7"),
        (tiny_model("qwen3_moe"), "8", "keep between 2 and 7"),
    ]:
        out = tmp_path / f"out-{keep}"
        proc = compress("prune", src, "-o", out, "--method", "experts", "--experts-keep", keep, "--no-eval")
        assert msg in assert_one_line_error(proc, 2)
        assert not out.exists()
    with pytest.raises(UsageError, match="between 2 and 7"):
        experts.kept(8, 2, 0.1)
    assert experts.kept(8, 2, 0.5) == 4 and experts.kept(8, 2, 3) == 3


def test_unstructured_reaches_every_expert(tiny_model, tmp_path):
    """SparseGPT on a mixture of experts prunes every expert's linears (per-expert, under the names transformers
    merges on load) and leaves the routers dense; the report lists the routed calibration tokens."""
    out = tmp_path / "sparse"
    proc = compress(
        "prune", tiny_model("qwen2_moe"), "-o", out, "--method", "sparsegpt", "--sparsity", "0.5", "--samples", "4",
        "--seq-len", "64", "--no-eval",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    stored = _tensors(out)
    expert_weights = [t for k, t in stored.items() if ".experts." in k]
    assert len(expert_weights) == 2 * 8 * 3
    assert all(abs(float((t == 0).float().mean()) - 0.5) < 0.02 for t in expert_weights)
    assert all(float((stored[f"model.layers.{i}.mlp.{r}.weight"] == 0).float().mean()) == 0 for i in range(2)
               for r in ("gate", "shared_expert_gate"))  # fmt: skip
    routed = json.loads((out / "report.json").read_text())["stages"][0]["expert_tokens"]
    assert len(routed) == 2 and all(sum(c) == 4 * 64 * 2 for c in routed.values())
