"""A mixture of experts calibrated with GPTQ: every expert gets statistics, routed tokens are reported."""

import torch
from rich.console import Console
from safetensors import safe_open

from compress import api
from compress.recipe import validate
from compress.report.render import markdown


def _quantize(src, out, method):
    recipe = validate(
        {
            "model": str(src),
            "output": str(out),
            "evaluate": {"enabled": False},
            "stages": [
                {"stage": "quantize", "scheme": "w4a16", "group_size": 32, "method": method, "samples": 4,
                 "seq_len": 64}
            ],
        }
    )  # fmt: skip
    return api.run(recipe, Console(file=open("/dev/null", "w")))


def _experts(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if ".experts." in k and k.endswith("weight_packed")}


def test_gptq_reaches_every_expert(tiny_model, tmp_path):
    """Every expert's integers differ from plain rounding's (GPTQ had a Hessian for each, also for experts the
    router seldom picks); the report lists each layer's routed tokens, top-k per calibration token."""
    src = tiny_model("qwen3_moe")  # 8 experts, 2 per token, 2 MoE layers
    report = _quantize(src, tmp_path / "gptq", "gptq")
    gptq, rtn = _experts(tmp_path / "gptq"), _experts(_quantize(src, tmp_path / "rtn", "rtn") and tmp_path / "rtn")
    assert len(gptq) == 2 * 8 * 3 and gptq.keys() == rtn.keys()
    assert all(not torch.equal(gptq[k], rtn[k]) for k in gptq)
    routed = report.stages[0].expert_tokens
    assert sorted(routed) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(len(c) == 8 and sum(c) == 4 * 64 * 2 for c in routed.values())
    assert "## Experts (quantize)" in markdown(report)
