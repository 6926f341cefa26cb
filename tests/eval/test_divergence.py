"""KL divergence and top-1 agreement against hand-computed cases and between real models."""

import math

import pytest
import torch

from compress.eval.divergence import compare
from compress.primitives.kl import kl_top1


def test_kl_of_a_hand_computed_case():
    p, q = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.25, 0.5, 0.25])
    kl, same = kl_top1(p.log()[None], q.log()[None])  # logits: log-probabilities up to a constant
    assert float(kl[0]) == pytest.approx(0.5 * math.log(2) + 0.25 * math.log(0.5), abs=1e-6)  # = 0.25 ln 2
    assert not bool(same[0])
    kl, same = kl_top1((p.log() + 3.0)[None], p.log()[None])  # a shift of the logits is the same distribution
    assert float(kl[0]) == pytest.approx(0.0, abs=1e-7) and bool(same[0])


def test_top1_agreement_counts_positions_with_the_same_argmax():
    base = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    other = torch.tensor([[2.0, 1.0, 0.0], [2.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    kl, same = kl_top1(base, other)
    assert same.tolist() == [True, False, True, False] and bool((kl > 0).all())


def test_compare_a_model_with_itself_and_with_a_changed_copy(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama")).float().eval()
    windows = torch.randint(0, model.config.vocab_size, (3, 32), generator=torch.Generator().manual_seed(0))
    same = compare(model, model, windows, "random tokens", batch_size=2)
    assert same.positions == 3 * 31 and same.kl_max == pytest.approx(0.0, abs=1e-6) and same.top1_agreement == 1.0
    changed = AutoModelForCausalLM.from_pretrained(tiny_model("llama")).float().eval()
    with torch.no_grad():
        changed.lm_head.weight.add_(torch.randn_like(changed.lm_head.weight) * 0.05)
    got = compare(model, changed, windows, "random tokens", batch_size=2)
    assert 0 < got.kl_mean <= got.kl_p99 <= got.kl_max and got.top1_agreement < 1.0


def test_eval_scores_further_texts_beside_the_first(tiny_model, tmp_path):
    """`--also licenses`: perplexity of base and result and the result's divergence on the second text too, each
    named in the report; a bad name is one line, before anything is measured."""
    import json

    from tests.cli.test_errors import assert_one_line_error, compress

    src = tiny_model("llama")
    out = tmp_path / "q"
    args = ["--scheme", "w8a16", "--method", "rtn", "--no-eval"]
    assert compress("quantize", src, "-o", out, *args).returncode == 0
    proc = compress("eval", out, "--baseline", src, "--also", "licenses", "--no-latency", "--eval-tokens", "256",
                    "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(proc.stdout)
    (base,), (mine,) = rep["base"]["domains"], rep["result"]["domains"]
    assert mine["perplexity"]["text"].startswith("licenses:") and base["divergence"] is None
    assert mine["divergence"]["positions"] > 0 and 0 < mine["divergence"]["top1_agreement"] <= 1
    assert mine["perplexity"]["value"] != rep["result"]["perplexity"]["value"]  # another text, another number
    table = compress("eval", out, "--baseline", src, "--also", "licenses", "--no-latency", "--eval-tokens", "256")
    assert "perplexity, licenses" in table.stdout and "KL divergence vs base, licenses" in table.stdout
    line = assert_one_line_error(compress("eval", out, "--also", str(tmp_path / "missing.txt"), "--no-latency"), 2)
    assert "missing.txt" in line
