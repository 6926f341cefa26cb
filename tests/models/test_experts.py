"""Mixture-of-experts blocks as per-expert linears: same outputs as transformers' fused experts, every expert
calibrated on every token, routed tokens counted."""

import pytest
import torch
import transformers as tf

from compress.models import experts
from tests.conftest import tiny_config


def _model(arch: str):
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(tiny_config(arch, 300)).eval()


@pytest.mark.parametrize(
    "arch, names, routers",
    [
        ("mixtral", experts.Names("w1", "w3", "w2"), 0),
        ("qwen2_moe", experts.Names("gate_proj", "up_proj", "down_proj"), 2),  # shared_expert_gate per layer
        ("qwen3_moe", experts.Names("gate_proj", "up_proj", "down_proj"), 0),
        ("deepseek_v3", experts.Names("gate_proj", "up_proj", "down_proj"), 0),
    ],
)
def test_unfused_model_computes_the_same(arch, names, routers):
    """The per-expert names come from transformers' own conversion mapping; the unfused model's logits equal the
    fused model's (float32, the same sums in the same order)."""
    model = _model(arch)
    assert experts.checkpoint_names(model) == names
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        assert len(experts.unfuse(model)) == routers
        got = model(ids).logits
    assert not experts.fused_modules(model)
    assert all(isinstance(m.weight, torch.nn.Parameter) for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert torch.allclose(want, got, atol=1e-5), (want - got).abs().max()


def test_calibrating_sends_every_token_to_every_expert():
    """While calibrating, an expert the router never picks still reads all tokens (its linears' inputs hold every
    token); the output is only the routed tokens' (unchanged), and the routed counts are kept per call."""
    model = _model("mixtral")
    experts.unfuse(model)
    block = next(m for m in model.modules() if isinstance(m, experts.Experts))
    seen = []
    block[3].w1.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    hidden = torch.randn(10, 64)
    index = torch.tensor([[0, 1], [1, 2]] * 5)  # expert 3 never routed
    weights = torch.full((10, 2), 0.5)
    with torch.no_grad():
        plain = block(hidden, index, weights)
        assert seen == []  # not calibrating: an expert with no tokens does not run
        with experts.calibrating(model):
            calibrated = block(hidden, index, weights)
            block(hidden, index, weights)
    assert seen == [10, 10] and torch.allclose(plain, calibrated, atol=1e-6)  # matmuls of other shapes: ~1 ulp
    assert not block.all_tokens
    counts = experts.routed_tokens(model, batches=1)
    name = next(n for n, m in model.named_modules() if m is block)
    assert counts[name] == [5, 10, 5, 0]


def test_unknown_layout_is_left_alone():
    """gpt-oss's experts (biases, a clamped activation) are not matched: nothing is swapped."""
    model = _model("gpt_oss")
    assert experts.fused_modules(model) == {} and experts.unfuse(model) == []


def _for_model(kind: str, **extra):
    cfg = tf.AutoConfig.for_model(
        kind, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg)


def test_routers_stay_full_precision_wherever_they_sit():
    """Llama 4's router is a linear beside experts `unfuse` does not know (gate_up_proj [E, H, 2I]): found by its
    width (as many outputs as experts), so it is ignored with the output layer."""
    from compress.models import arch

    model = _for_model("llama4_text")
    assert experts.unfuse(model) == []
    targets, ignore = arch.quant_targets(model, [])
    routers = [f"model.layers.{i}.feed_forward.router" for i in range(2)]
    assert set(routers) <= set(ignore) and not set(routers) & set(targets)
    assert "model.layers.0.feed_forward.shared_expert.down_proj" in targets


def test_experts_transformers_reads_one_by_one_are_refused():
    """transformers swaps Llama 4's fused experts for per-expert linears before reading a compressed-tensors
    checkpoint: written fused, they would reload as random values (measured: 144 missing tensors)."""
    from compress.errors import UsageError

    model = _for_model("llama4_text")
    with pytest.raises(UsageError, match="Llama4TextExperts.*reload as random values"):
        experts.check_rereadable(model)
    experts.check_rereadable(_model("mixtral"))  # its per-expert names are the checkpoint's own
