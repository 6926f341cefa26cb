"""Mixed precision (`--target-bits`): the allocation meets its budget where the cost is, the checkpoint stores each
linear at its own width in compressed-tensors config groups that plain transformers reloads, and every exporter
reads the widths back."""

import json

import pytest
import torch

from compress.errors import UsageError
from compress.formats import stored
from compress.primitives.qparams import Grid
from compress.quant import mixed
from compress.quant.schemes import grid_bits
from tests.formats.test_tiny_models import fresh_outputs, quantize

GRIDS = {b: Grid(b, "int", True, 32) for b in (3, 4, 5, 8)}


def test_budget_goes_where_the_cost_is():
    """Two linears of one size and room for one upgrade: the costly one gets it."""
    costs = {"a": {3: 10.0, 4: 5.0, 5: 2.0, 8: 1.0}, "b": {3: 0.1, 4: 0.05, 5: 0.02, 8: 0.01}}
    sizes = {"a": (64, 64), "b": (64, 64)}
    target = (grid_bits(GRIDS[3], 64) + grid_bits(GRIDS[5], 64)) / 2
    assert mixed.allocate(costs, sizes, GRIDS, target) == {"a": 5, "b": 3}


def test_allocation_stays_within_budget_and_spends_it():
    g = torch.Generator().manual_seed(0)
    names = [f"l{i}" for i in range(40)]
    sizes = {n: (int(o), 64) for n, o in zip(names, torch.randint(1, 9, (40,), generator=g) * 32)}
    costs = {}
    for n in names:
        base = float(torch.rand(1, generator=g)) * 10
        costs[n] = {b: base * 4.0 ** -(b - 3) for b in GRIDS}  # each bit quarters the error
    total = sum(o * i for o, i in sizes.values())
    for target in (3.8, 4.6, 6.0):
        choice = mixed.allocate(costs, sizes, GRIDS, target)
        used = sum(grid_bits(GRIDS[b], sizes[n][1]) * sizes[n][0] * sizes[n][1] for n, b in choice.items())
        assert used / total <= target + 1e-9
        # what is left is less than the smallest upgrade still open (a 1-bit step of the smallest linear)
        open_steps = [sizes[n][0] * sizes[n][1] for n, b in choice.items() if b < 8]
        assert not open_steps or target - used / total < min(open_steps) * 3 / total


def test_target_outside_the_widths_is_refused():
    with pytest.raises(UsageError, match=r"outside what widths 3 to 8 store here: 3\.50 to 8\.50"):
        mixed.check_target(9.0, GRIDS, {64: 4096})
    mixed.check_target(4.0, GRIDS, {64: 4096})


@pytest.fixture(scope="module")
def mixed_ckpt(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "out"
    report = quantize(tiny_model("llama"), out, "w4a16", group_size=32, target_bits=5.0, bit_widths=[4, 5, 8])
    return out, report


def test_checkpoint_stores_each_linear_at_its_width(mixed_ckpt):
    out, report = mixed_ckpt
    record = report.stages[0]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = qc["config_groups"]
    assert len(groups) >= 2  # several widths in use
    weights = stored.read(out)
    assert {n: w.bits for n, w in weights.items()} == record.linear_bits
    for group in groups.values():  # each group names its linears, no class target that would catch the others
        assert all(weights[t].bits == group["weights"]["num_bits"] for t in group["targets"])
    numel = sum(w.q.numel() for w in weights.values())
    stored_bits = sum(grid_bits(Grid(w.bits, "int", True, 32), w.q.shape[1]) * w.q.numel() for w in weights.values())
    assert stored_bits / numel <= 5.0 and record.settings["bits_per_weight"] == pytest.approx(stored_bits / numel, 1e-3)
    assert all(w.symmetric for w in weights.values())  # mixed widths default to symmetric (zero points refused)
    for w in weights.values():  # integers in their own width's range
        assert int(w.q.min()) >= -(2 ** (w.bits - 1)) and int(w.q.max()) <= 2 ** (w.bits - 1) - 1


def test_plain_transformers_reloads_the_widths(mixed_ckpt, tiny_model, tmp_path):
    """In a fresh process without compress: the mixed checkpoint's outputs are those of our de-quantized weights."""
    from transformers import AutoModelForCausalLM

    out, _ = mixed_ckpt
    got = fresh_outputs({"llama": {"mixed": str(out)}}, tmp_path)["llama/mixed"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32).eval()
    for name, w in stored.read(out).items():
        model.get_submodule(name).weight.data = w.dequantized()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


def test_gguf_carries_every_width_exactly(mixed_ckpt, tmp_path):
    from compress.export import gguf_export
    from compress.models.load import load
    from compress.models.source import resolve

    out, report = mixed_ckpt
    loaded = load(resolve(str(out)), dtype="float32", quantized=True)
    (tmp_path / "g").mkdir()
    got = gguf_export.export(loaded, tmp_path / "g")
    widths = report.stages[0].linear_bits
    assert got.requantized == 0 and got.exact == len(widths)
    assert got.check.verdict == "every exact tensor identical"
    want = {"Q4_0": 0, "Q5_0": 0, "Q8_0": 2}  # + token embedding and output layer, Q8_0 by default
    for b in widths.values():
        want[{4: "Q4_0", 5: "Q5_0", 8: "Q8_0"}[b]] += 1
    assert {k: v for k, v in got.types.items() if k in want} == {k: v for k, v in want.items() if v}


@pytest.mark.parametrize(
    "stage, words",
    [
        ({"scheme": "w8a8", "target_bits": 6.0}, "not a weight-only int scheme"),
        ({"scheme": "fp8", "target_bits": 6.0}, "not a weight-only int scheme"),
        ({"scheme": "nf4", "target_bits": 4.0}, "not a weight-only int scheme"),
        ({"scheme": "w4a16", "target_bits": 4.5, "bit_widths": [4]}, "at least two of 2 to 8"),
        ({"scheme": "w4a16", "target_bits": 5.0, "symmetric": False, "group_size": 32}, "drop --no-symmetric"),
        ({"scheme": "w4a16", "target_bits": 4.5, "bit_widths": [4, 12]}, "at least two of 2 to 8"),
    ],
)
def test_bad_mixed_stage(tiny_model, tmp_path, stage, words):
    with pytest.raises(UsageError, match=words):
        quantize(tiny_model("llama"), tmp_path / "o", stage.pop("scheme"), **stage)


def test_mixture_of_experts_is_refused(tiny_model, tmp_path):
    with pytest.raises(UsageError, match="mixture of experts"):
        quantize(tiny_model("qwen3_moe"), tmp_path / "o", "w4a16", group_size=32, symmetric=True, target_bits=5.0)


def test_cli_refuses_a_budget_out_of_range(tiny_model, tmp_path):
    from tests.cli.test_errors import assert_one_line_error, compress

    args = ["quantize", tiny_model("llama"), "-o", tmp_path / "o", "--group-size", "32", "--no-eval"]
    msg = assert_one_line_error(compress(*args, "--target-bits", "8.9", "--bit-widths", "3,4"), 2)
    assert "outside what widths 3 to 4 store here" in msg
    msg = assert_one_line_error(compress(*args, "--target-bits", "4", "--bit-widths", "3,x"), 2)
    assert "comma-separated integers" in msg
    assert not (tmp_path / "o").exists()


def test_onnx_takes_each_width(tiny_model, tmp_path):
    """4- and 8-bit linears are MatMulNBits of their own width; the 8-bit ones at accuracy level 4 (ONNX Runtime's
    fast int8 path), so the check compares greedy tokens rather than exact logits."""
    import onnx

    from compress.export import onnx_decoder, onnx_export
    from compress.models.load import load
    from compress.models.source import resolve

    out = tmp_path / "q"
    report = quantize(
        tiny_model("llama"), out, "w4a16", group_size=32, symmetric=True, target_bits=6.0, bit_widths=[4, 8]
    )
    assert set(report.stages[0].linear_bits.values()) == {4, 8}
    loaded = load(resolve(str(out)), dtype="float32", quantized=True)
    (tmp_path / "onnx").mkdir()
    got = onnx_export.export(loaded, tmp_path / "onnx", onnx_decoder.Options(), threads=1)
    nodes = [n for n in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    levels = {}
    for n in nodes:
        a = {x.name: x.i for x in n.attribute}
        levels.setdefault(a["bits"], set()).add(a["accuracy_level"])
    assert levels[4] == {0} and levels[8] == {4}
    assert any("accuracy_level 4" in note for note in got.notes)
    assert got.check.top1_agreement >= 0.9
