"""GPTAQ: the engine measures each linear's input drift against the unchanged model (zero in the first decoder layer,
where both streams are the same, so GPTAQ is GPTQ exactly there), the method runs end to end, and its drift term
pulls the model's outputs towards the unchanged model's."""

import torch

from compress import calibrate
from compress.calibrate import Gather
from compress.models import arch
from compress.models.load import load
from compress.models.source import resolve
from tests.quant.test_calibrated import batches, run_method


def test_drift_is_zero_where_the_streams_agree_and_grows_after(tiny_model):
    loaded = load(resolve(str(tiny_model("llama"))), dtype="float32")
    model = loaded.model
    layers, _ = arch.quant_targets(model, [])
    seen = {}

    def treat(lins, stats):
        seen[next(n for n, m in layers.items() if m is lins[0])] = stats.drift.clone()
        for lin in lins:  # a crude change of every linear, so that the next layer's inputs drift
            lin.weight.data = (lin.weight * 8).round() / 8
        return [None] * len(lins)

    calibrate.calibrate_linears(
        model,
        layers,
        batches(model.config.vocab_size),
        torch.device("cpu"),
        gather=lambda layer, targets: Gather(hessian=True, drift=True),
        treat=treat,
        float_stream=True,
    )
    first = {n: d for n, d in seen.items() if ".layers.0." in n}
    later = {n: d for n, d in seen.items() if ".layers.1." in n}
    assert first and later and len(seen) == len(first) + len(later)
    assert all(float(d.abs().max()) == 0 for d in first.values())
    assert all(float(d.abs().max()) > 0 for d in later.values())


def test_gptaq_equals_gptq_in_the_first_layer_and_differs_after(tiny_model):
    src = tiny_model("llama")
    *_, plain, _ = run_method(src, "gptq")
    *_, aware, errors = run_method(src, "gptaq", gptaq_alpha=1.0)
    assert set(plain) == set(aware) and len(errors) == 2
    for name in plain:
        same = torch.equal(plain[name].q, aware[name].q)
        assert same if ".layers.0." in name else not same, name
