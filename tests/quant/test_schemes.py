import pytest

from compress.errors import UsageError
from compress.quant.schemes import fitting_groups, resolve
from compress.recipe import QuantizeStage

SMOL = {"model.layers.0.self_attn.q_proj": 576, "model.layers.0.mlp.down_proj": 1536}


def test_default_group_128_does_not_fit_smollm2_and_says_what_does():
    with pytest.raises(UsageError) as exc:
        resolve(QuantizeStage(scheme="w4a16"), SMOL)
    msg = str(exc.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "576" in msg and "64, 32" in msg and "auto" in msg


def test_auto_picks_largest_fitting_group():
    scheme = resolve(QuantizeStage(scheme="w4a16", group_size="auto"), SMOL)
    assert scheme.weight.group_size == 64 and "auto" in scheme.group_note
    assert fitting_groups({"a": 384, "b": 1536}) == [128, 64, 32, 16]


def test_channel_and_explicit_group():
    assert resolve(QuantizeStage(scheme="w4a16", group_size="channel"), SMOL).weight.group_size is None
    assert resolve(QuantizeStage(scheme="w4a16", group_size=32), SMOL).weight.group_size == 32
    assert resolve(QuantizeStage(scheme="w8a16"), SMOL).weight.group_size is None


@pytest.mark.parametrize("scheme,act,kind", [("w8a8", "int8", "int"), ("fp8", "fp8", "float")])
def test_activation_schemes(scheme, act, kind):
    s = resolve(QuantizeStage(scheme=scheme), SMOL)
    assert s.act == act and s.weight.kind == kind and s.weight.group_size is None
    ct = s.ct_scheme(["Linear"])
    assert ct.input_activations.dynamic is True and ct.input_activations.strategy == "token"


def test_rejected_combinations():
    with pytest.raises(UsageError, match="per output channel"):
        resolve(QuantizeStage(scheme="w8a8", group_size=64), SMOL)
    with pytest.raises(UsageError, match="symmetric"):
        resolve(QuantizeStage(scheme="fp8", symmetric=False), SMOL)
    with pytest.raises(UsageError, match="1618"):
        resolve(QuantizeStage(scheme="w4a16", group_size=64, symmetric=False), SMOL)
    with pytest.raises(ValueError, match="power of two"):
        QuantizeStage(scheme="w4a16", group_size=100)


def test_asymmetric_int8_is_allowed():
    assert resolve(QuantizeStage(scheme="w8a16", symmetric=False), SMOL).weight.symmetric is False
