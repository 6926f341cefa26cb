"""Structured pruning on tiny models: smaller tensors, a rewritten config, and a checkpoint that
plain transformers reloads (in a fresh process) with the same outputs."""

import json
import subprocess
import sys

import pytest
import torch

from compress.errors import UsageError
from compress.prune.methods import structured
from tests.cli.test_errors import assert_one_line_error, compress

FRESH = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    torch.save(model(torch.tensor([[5, 17, 300, 42, 7, 99]])).logits, sys.argv[2])
"""


def test_structured_shrinks_and_reloads_identically(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model("llama")  # 2 layers, 4 heads over 2 key/value heads, 128 MLP channels
    out = tmp_path / "out"
    proc = compress(
        "prune",
        src,
        "-o",
        out,
        "--method",
        "structured",
        "--drop-layers",
        "1",
        "--mlp-keep",
        "0.5",
        "--heads-keep",
        "0.5",
        "--samples",
        "8",
        "--seq-len",
        "32",
        "--no-latency",
        "--eval-tokens",
        "512",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(proc.stdout)
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["num_hidden_layers"],
        cfg["intermediate_size"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["head_dim"],
    ) == (1, 64, 2, 2, 16)
    st = rep["stages"][0]["settings"]
    assert st["parameters_after"] < st["parameters_before"] and rep["result"]["parameters"] == st["parameters_after"]
    assert rep["result"]["bytes_on_disk"] < rep["base"]["bytes_on_disk"]

    # the same pruning in memory, against the checkpoint reloaded by plain transformers elsewhere
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    layers = model.model.layers
    assert layers[0].mlp.down_proj.in_features == 128
    (tmp_path / "fresh.py").write_text(FRESH)
    subprocess.run(
        [sys.executable, tmp_path / "fresh.py", out, tmp_path / "logits.pt"], check=True, capture_output=True
    )
    reloaded = torch.load(tmp_path / "logits.pt")
    mine = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(mine(torch.tensor([[5, 17, 300, 42, 7, 99]])).logits, reloaded)


@pytest.mark.parametrize("arch_name", ["qwen2", "qwen3", "gemma2"])  # qwen3: per-head q/k norms; gemma2: head_dim
def test_in_memory_pruned_model_matches_its_checkpoint(tiny_model, tmp_path, arch_name):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model(arch_name), dtype=torch.float32).eval()
    torch.manual_seed(0)
    batches = [torch.randint(0, 1000, (2, 16)) for _ in range(2)]
    plan = structured.Plan(drop_layers=[0], mlp_keep=0.75, heads_keep=0.5)
    structured.check(model, plan)
    imp = structured.measure_importance(model, batches, torch.device("cpu"))
    assert len(imp.layers) == 2 and imp.channels[0].shape == (128,) and imp.heads[0].shape == (4,)
    done = structured.apply(model, plan, imp)
    assert done["dropped_layers"] == [0] and model.model.layers[0].self_attn.layer_idx == 0
    ids = torch.tensor([[5, 17, 300, 42, 7, 99]])
    with torch.no_grad():
        before = model(ids).logits
        cached = model.generate(ids, max_new_tokens=4, do_sample=False)  # the KV cache indexes layers by layer_idx
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "fresh.py").write_text(FRESH)
    subprocess.run(
        [sys.executable, tmp_path / "fresh.py", tmp_path / "m", tmp_path / "logits.pt"], check=True, capture_output=True
    )
    assert torch.equal(torch.load(tmp_path / "logits.pt"), before)
    assert cached.shape == (1, 10)


def test_importance_drops_the_layer_that_changes_least(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32).eval()
    model.model.layers[1].mlp.down_proj.weight.data.zero_()  # layer 1 now barely changes its input
    model.model.layers[1].self_attn.o_proj.weight.data.zero_()
    imp = structured.measure_importance(model, [torch.randint(0, 1000, (2, 16))], torch.device("cpu"))
    assert imp.layers[1] == pytest.approx(0, abs=1e-6) and imp.layers[0] > 0.01
    done = structured.apply(model, structured.Plan(drop_layers=1), imp)
    assert done["dropped_layers"] == [1]


@pytest.mark.parametrize(
    "plan,needle",
    [
        (structured.Plan(heads_keep=0.75), "grouped-query attention"),
        (structured.Plan(drop_layers=2), "at least one must stay"),
        (structured.Plan(drop_layers=[0, 1]), "drop all"),
        (structured.Plan(drop_layers=[5]), "layers 0..1"),
    ],
)
def test_plans_that_cannot_work(tiny_model, plan, needle):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"))
    with pytest.raises(UsageError, match=needle):
        structured.check(model, plan)


def test_structured_errors_through_the_command(tiny_model, tmp_path):
    line = assert_one_line_error(
        compress(
            "prune",
            tiny_model("llama"),
            "-o",
            tmp_path / "o",
            "--method",
            "structured",
            "--heads-keep",
            "0.75",
            "--no-eval",
        ),
        2,
    )
    assert "grouped-query attention needs the same whole number kept per group: use 1/2, 2/2" in line
    line = assert_one_line_error(
        compress(
            "prune",
            tiny_model("opt"),
            "-o",
            tmp_path / "o",
            "--method",
            "structured",
            "--heads-keep",
            "0.5",
            "--no-eval",
        ),
        2,
    )
    assert "llama-style" in line and "layer 0 has no linear self_attn.o_proj" in line
    line = assert_one_line_error(
        compress(
            "prune",
            tiny_model("llama"),
            "-o",
            tmp_path / "o",
            "--method",
            "structured",
            "--drop-layers",
            "x,y",
            "--no-eval",
        ),
        2,
    )
    assert "--drop-layers" in line and not (tmp_path / "o").exists()


@torch.no_grad()
@pytest.mark.parametrize("arch_name", ["opt", "gpt_neox"])
def test_any_decoder_drops_layers(tiny_model, tmp_path, arch_name):
    """Dropping a layer needs no llama-style block: OPT and GPT-NeoX (its own layer names) reload the same."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model(arch_name), dtype=torch.float32).eval()
    plan = structured.Plan(drop_layers=1)
    structured.check(model, plan)
    structured.apply(model, plan, structured.measure_importance(model, [torch.randint(0, 1000, (2, 16))], "cpu"))
    ids = torch.tensor([[5, 17, 300, 42, 7, 99]])
    model.save_pretrained(tmp_path / "m")
    assert model.config.num_hidden_layers == 1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


@torch.no_grad()
def test_dropping_layers_never_reads_heads_it_does_not_prune(tmp_path):
    """DeepSeek's latent attention: o_proj takes heads x v_head_dim (8 here), not heads x head_dim (16). A plan that
    only drops layers must not split o_proj into heads of head_dim to score them."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    cfg = tiny_config("deepseek_v3", 1000)
    cfg.v_head_dim = 8
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    o_proj = structured.decoder_layers(model)[0].self_attn.o_proj
    assert o_proj.in_features == 4 * 8 != 4 * structured._head_dim(model.config)
    plan = structured.Plan(drop_layers=[1])  # the MoE layer: the config's first dense layer must stay first
    structured.check(model, plan)
    imp = structured.measure_importance(model, [torch.randint(0, 1000, (2, 16))], "cpu", plan=plan)
    assert len(imp.layers) == 2 and all(h.numel() == 0 for h in imp.heads)
    structured.apply(model, plan, imp)
    ids = torch.tensor([[5, 17, 300, 42, 7, 99]])
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 1
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_a_config_that_cannot_describe_the_result_is_refused_before_calibration():
    """Helium's attention sizes o_proj by hidden_size / heads, whatever head_dim says: after removing heads its
    config would rebuild wider layers than the pruned ones, so the plan is refused while checking, weights intact."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "helium", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UsageError, match="no longer describes the pruned layers .*o_proj"):
        structured.check(model, structured.Plan(heads_keep=0.5))
    assert model.model.layers[0].self_attn.o_proj.weight.shape == (64, 64) and model.config.num_attention_heads == 4
    structured.check(model, structured.Plan(drop_layers=1, mlp_keep=0.5))  # what its config can describe
