import pytest

from compress.formats.compressed_tensors import ct_scheme
from compress.formats.stored import activation_kind
from compress.quant.schemes import SchemeError, bits_per_weight, fitting_groups, resolve
from compress.recipe import QuantizeStage


def res(scheme, group_size=None, symmetric=True):
    return resolve(scheme, group_size, symmetric, SMOL)


SMOL = {"model.layers.0.self_attn.q_proj": 576, "model.layers.0.mlp.down_proj": 1536}


def test_default_group_128_does_not_fit_smollm2_and_says_what_does():
    with pytest.raises(SchemeError) as exc:
        res(scheme="w4a16")
    msg = str(exc.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "576" in msg and "64, 32" in msg and "auto" in msg


def test_auto_picks_largest_fitting_group():
    scheme = res(scheme="w4a16", group_size="auto")
    assert scheme.weight.group_size == 64 and "auto" in scheme.group_note
    assert fitting_groups({"a": 384, "b": 1536}) == [128, 64, 32, 16]


def test_channel_and_explicit_group():
    assert res(scheme="w4a16", group_size="channel").weight.group_size is None
    assert res(scheme="w4a16", group_size=32).weight.group_size == 32
    assert res(scheme="w8a16").weight.group_size is None


@pytest.mark.parametrize(
    "scheme,act,kind", [("w8a8", "int8", "int"), ("w8a8-asym", "int8-asym", "int"), ("fp8", "fp8", "float")]
)
def test_activation_schemes(scheme, act, kind):
    s = res(scheme=scheme)
    assert s.act == act and s.weight.kind == kind and s.weight.group_size is None and s.weight.symmetric
    ct = ct_scheme(s.weight, s.act, ["Linear"])
    assert ct.input_activations.dynamic is True and ct.input_activations.strategy == "token"
    assert ct.input_activations.symmetric == (scheme != "w8a8-asym")  # vLLM reads both (a zero point per token)
    assert activation_kind({"config_groups": {"g": ct.model_dump()}}) == act


def test_rejected_combinations():
    with pytest.raises(SchemeError, match="per output channel"):
        res(scheme="w8a8", group_size=64)
    with pytest.raises(SchemeError, match="symmetric"):
        res(scheme="fp8", symmetric=False)
    for scheme in ("w8a8", "w8a8-asym"):  # vLLM's W8A8 reads symmetric weights only
        with pytest.raises(SchemeError, match="w8a8-asym puts a zero point on each token"):
            res(scheme=scheme, symmetric=False)
    with pytest.raises(ValueError, match="power of two"):
        QuantizeStage(scheme="w4a16", group_size=100)


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16", "w3a16", "w2a16"])
def test_asymmetric_grids_are_allowed(scheme):
    assert res(scheme=scheme, group_size=32, symmetric=False).weight.symmetric is False


def test_plan_bits_follow_the_scheme_resolution():
    # the plan and the run choose the same group: auto on SmolLM2's widths is 64 (not 128)
    assert bits_per_weight("w4a16", "auto", True, [576, 1536]) == 4 + 16 / 64
    assert bits_per_weight("w4a16", None, True, [384, 1536]) == 4 + 16 / 128  # the default, 128
    assert bits_per_weight("w8a8", None, True, [576]) == 8
    assert bits_per_weight("w8a16", 32, False, [576]) == 8 + 24 / 32
    assert bits_per_weight("w4a16", 64, False, [576]) == 4 + 20 / 64  # the zero point packed at 4 bits


@pytest.mark.parametrize("scheme,bits,group", [("w3a16", 3, 32), ("w2a16", 2, 32), ("w5a16", 5, 32), ("w6a16", 6, 32)])
def test_low_bit_schemes(scheme, bits, group):
    s = res(scheme=scheme)
    assert s.weight.bits == bits and s.weight.group_size == group and s.act is None
    assert res(scheme=scheme, group_size=64).weight.group_size == 64
    assert s.weight.qmin == -(2 ** (bits - 1)) and s.weight.qmax == 2 ** (bits - 1) - 1
    assert bits_per_weight(scheme, None, True, [576, 1536]) == bits + 16 / group


def test_nf4_is_bitsandbytes_blocks_of_64_symmetric():
    s = res(scheme="nf4")
    assert (s.weight.kind, s.weight.group_size, s.weight.symmetric) == ("nf4", 64, True)
    assert bits_per_weight("nf4", None, True, [576, 1536]) == 4 + 32 / 64  # float32 absmax a block
    assert res(scheme="nf4", group_size="auto").weight.group_size == 64  # 128 does not divide 576
    with pytest.raises(SchemeError, match="symmetric by definition"):
        res(scheme="nf4", symmetric=False)
    for gs in (32, "channel"):
        with pytest.raises(SchemeError, match="bitsandbytes' sizes"):
            res(scheme="nf4", group_size=gs)
