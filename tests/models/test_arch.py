"""Smoothing maps of an architecture without an adapter, proven on its own layers."""

import pytest
import torch

from compress.errors import UsageError
from compress.models import arch
from compress.primitives.smoothing import fold


def _fold_all(model, scale=lambda n: torch.rand(n, generator=torch.Generator().manual_seed(2)) + 0.5) -> None:
    for layer in arch.decoder_layers(model):
        for m in arch.smooth_maps(model, layer):
            lins = [layer.get_submodule(n) for n in m.linears]
            s = m.tie(scale(lins[0].in_features), "amax")
            fold(layer.get_submodule(m.prev), lins, s, prev_s=m.prev_scale(s), offset=m.offset)


@torch.no_grad()
def test_proof_finds_the_llama_adapters_maps_on_smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    layer = arch.decoder_layers(model)[0]
    adapter = {(m.prev, m.linears, m.repeat, m.offset) for m in arch.smooth_maps(model, layer)}
    proven = {(m.prev, m.linears, m.repeat, m.offset) for m in arch.proven_maps(model, layer)}
    assert len(adapter) == 4 and proven == adapter


@torch.no_grad()
def test_a_fold_through_an_activation_that_does_not_commute_is_not_proven():
    """Arcee's MLP is down(relu(up(x))^2): a scale on up's outputs comes out squared, so up -> down must not be folded;
    the attention maps and the norm before up hold, and folding them leaves the logits as they were."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "arcee", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    prevs = {m.prev for m in arch.smooth_maps(model, arch.decoder_layers(model)[0])}
    assert prevs == {"input_layernorm", "post_attention_layernorm", "self_attn.v_proj"}
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    before = model(ids).logits
    _fold_all(model)
    assert torch.allclose(model(ids).logits, before, atol=1e-4, rtol=1e-4)


def test_gemma_norms_fold_through_one_plus_weight(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model("gemma"), dtype=torch.float32)
    maps = arch.smooth_maps(model, arch.decoder_layers(model)[0])
    assert {m.prev: m.offset for m in maps} == {
        "input_layernorm": 1.0, "post_attention_layernorm": 1.0, "self_attn.v_proj": 0.0, "mlp.up_proj": 0.0
    }  # fmt: skip


def test_an_encoder_with_nothing_to_fold_is_refused_in_one_line(minilm_dir):
    """all-MiniLM (BERT): each norm also feeds the residual, so no scale folds exactly."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_dir, dtype=torch.float32)
    with pytest.raises(UsageError, match="bert: no norm -> projection scale folds exactly"):
        arch.smooth_maps(model, arch.decoder_layers(model)[0])
