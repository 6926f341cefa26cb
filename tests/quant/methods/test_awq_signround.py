"""AWQ's scales, then SignRound: the scales are folded (the norms change), the tuned rounding lowers the
layer error below AWQ's own rounding, the integers stay in range, and both methods' options reach it."""

import torch

from tests.quant.test_calibrated import run_method


def test_awq_signround_beats_awq_and_folds_scales(tiny_model):
    src = tiny_model("llama")
    _, _, _, _, _, awq = run_method(src, "awq")
    loaded, layers, _, _, weights, tuned = run_method(src, "awq+signround", signround_steps=40, awq_grid=10)
    assert set(weights) == set(layers)
    # per-layer errors against the float layer on the quantized inputs (SignRound's `layer` target at 4 bits); measured
    # 0.0668 summed against AWQ's 0.1030 (RTN 0.1067): a random tiny model gives the scales little, SignRound alone
    # is level (0.0668); on SmolLM2 the scales count (benchmarks/RESULTS.md)
    assert sum(e.method for e in tuned) < 0.9 * sum(e.method for e in awq)
    for w in weights.values():
        assert w.q.dtype == torch.int8 and int(w.q.min()) >= -8 and int(w.q.max()) <= 7
    norms = [m.weight for n, m in loaded.model.named_modules() if n.endswith("input_layernorm")]
    assert any(not torch.equal(w, torch.ones_like(w)) for w in norms)  # AWQ's scales went into the norms
