"""Gates read every measured evaluation text: the worst one decides, and is named."""

from compress.recipe import Gates
from compress.report.gates import check
from compress.report.schema import Divergence, Domain, Measurement, Perplexity, Report


def report(base_ppl: list[float], ppl: list[float], kl: list[float]) -> Report:
    def div(v: float, text: str) -> Divergence:
        return Divergence(kl_mean=v, kl_p99=v, kl_max=v, top1_agreement=0.9, positions=10, text=text)

    def m(ppls: list[float], kls: list[float] | None) -> Measurement:
        texts = ["pages; more", "licenses: Debian license texts"]
        pp = [Perplexity(value=v, text=t, seq_len=512, tokens=8192) for v, t in zip(ppls, texts)]
        divs = [div(v, t) for v, t in zip(kls, texts)] if kls else [None, None]
        return Measurement(path="x", bytes_on_disk=1, bits_per_weight=None, perplexity=pp[0], divergence=divs[0],
                           domains=[Domain(perplexity=p, divergence=d) for p, d in zip(pp[1:], divs[1:])])  # fmt: skip

    return Report(tool="t", created="now", model="m", task="causal-lm", recipe={}, stages=[],
                  base=m(base_ppl, None), result=m(ppl, kl), environment={})  # fmt: skip


def test_the_worst_text_decides_and_is_named():
    gates = Gates(max_ppl_increase=0.10, max_kl_divergence=0.2)
    ppl, kl = check(gates, report([10.0, 20.0], [10.5, 23.0], [0.05, 0.3]))
    assert not ppl.passed and abs(ppl.value - 0.15) < 1e-9 and "on licenses" in ppl.shown
    assert not kl.passed and kl.value == 0.3 and "on licenses" in kl.shown
    ppl, kl = check(gates, report([10.0, 20.0], [10.5, 21.0], [0.05, 0.1]))
    assert ppl.passed and abs(ppl.value - 0.05) < 1e-9 and "on pages" in ppl.shown and kl.passed
    one = report([10.0], [10.5], [0.05])  # one text: the value alone, no text named
    ppl, kl = check(gates, one)
    assert ppl.passed and " on " not in ppl.shown and kl.passed and kl.value == 0.05
