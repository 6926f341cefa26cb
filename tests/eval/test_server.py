"""The measuring server: a worker's failure is one line naming its cause, and a server that died
is replaced by the next measurement."""

import shutil

import pytest

from compress.data.text import Texts
from compress.errors import CompressError
from compress.eval import measure as measuring
from compress.recipe import EvalSpec

TEXTS = Texts(["The quick brown fox jumps over the lazy dog. " * 40] * 2, "test sentences")
SPEC = EvalSpec(max_tokens=128, seq_len=64, latency=False)


def test_a_failed_measurement_names_its_cause(tiny_model, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model("llama"), bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CompressError, match=r"measuring .*bad failed: .*\w") as err:
        measuring.measure(bad, "causal-lm", SPEC, TEXTS, [])
    assert "\n" not in str(err.value)


def test_a_dead_server_is_replaced(tiny_model):
    first = measuring.measure(tiny_model("llama"), "causal-lm", SPEC, TEXTS, []).measurement
    server = measuring._server()
    server.kill()
    server.wait()
    again = measuring.measure(tiny_model("llama"), "causal-lm", SPEC, TEXTS, []).measurement
    assert again.perplexity == first.perplexity and measuring._server() is not server
