"""report.html: self-contained (no script, nothing fetched), every plot a real PNG, gates
coloured; rendered in headless Chromium without console errors where Chromium is installed."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess

import pytest

from compress.report import html_report
from compress.report.schema import (
    GateResult,
    Latency,
    LayerError,
    Measurement,
    Perplexity,
    Report,
    Speed,
    StageRecord,
    Training,
)

IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)">')


def full_report() -> Report:
    def m(ppl: float, size: int, rate: float) -> Measurement:
        lat = Latency(prefill_tokens_per_s=10 * rate, decode_tokens_per_s=rate, prefill_range=[9 * rate, 11 * rate],
                      decode_range=[0.9 * rate, 1.1 * rate], rounds=5, prompt_len=128, new_tokens=32,
                      kernel="torch dense <matmul>", device="cpu", dtype="float32")  # fmt: skip
        pp = Perplexity(value=ppl, text="held-out <text> & more", seq_len=512, tokens=8192)
        return Measurement(path="out", bytes_on_disk=size, bits_per_weight=4.25, perplexity=pp, latency=lat)

    quant = StageRecord(stage="quantize", settings={"method": "gptq", "scheme": "w4a16"}, layers=7, ignored=[],
                        seconds=3.0, layer_errors=[LayerError(layer=i, rtn=0.1 + i / 50, method=0.05 + i / 80)
                                                   for i in range(6)])  # fmt: skip
    curve = [{"step": i, "loss": 3.0 / i, "lr": 1e-4, "seconds": 0.1 * i} for i in range(1, 20)]
    distill = StageRecord(stage="distill", settings={"steps": 19}, layers=0, ignored=[], seconds=9.0,
                          training=Training(steps=19, tokens=1000, seconds=9.0, tokens_per_s=111.0, text="t",
                                            curve=curve))  # fmt: skip
    speed = Speed(prefill=1.1, prefill_range=[1.0, 1.2], decode=1.05, decode_range=[1.0, 1.1], rounds=5, noisy=False)
    return Report(
        tool="compress test", created="now", model="<script>alert(1)</script>", task="causal-lm", recipe={},
        stages=[quant, distill], base=m(14.0, 270 << 20, 30.0), result=m(15.0, 90 << 20, 31.0), environment={"x": "y"},
        speed=speed, passed=False,
        gates=[GateResult(name="max_size_ratio", limit=0.5, value=0.33, passed=True, shown="0.33x (limit 0.5x)"),
               GateResult(name="max_ppl_increase", limit=0.05, value=0.07, passed=False, shown="+7% (limit +5%)")],
    )  # fmt: skip


def test_page_is_self_contained_with_every_plot_and_coloured_gates():
    page = html_report.page(full_report())
    imgs = IMG.findall(page)
    assert {alt for _, alt in imgs} == {
        "size against quality",
        "per-layer output error",
        "latency",
        "distillation loss",
    }
    for data, _ in imgs:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<script" not in page and "http://" not in page and "https://" not in page  # nothing runs or loads
    assert "&lt;script&gt;" in page  # names from files are escaped
    assert re.search(r'<tr class="pass">.*?max_size_ratio', page) and re.search(r'<tr class="fail">.*?max_ppl', page)
    assert "Gates: FAILED" in page and "1.05x (1.00-1.10)" in page


def test_a_report_with_nothing_measured_still_renders():
    bare = Report(tool="t", created="c", model="m", task="causal-lm", recipe={}, stages=[], base=None,
                  result=Measurement(path="o", bytes_on_disk=1, bits_per_weight=None), environment={})  # fmt: skip
    page = html_report.page(bare)
    assert not IMG.findall(page) and "Nothing to plot" in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_chromium_renders_every_plot_without_console_errors(tmp_path):
    page = html_report.page(full_report())
    # A copy with a probe (the report itself has no script): the title says how many images decoded.
    probe = (
        "<script>onload=()=>{const i=[...document.images];"
        "document.title=i.filter(x=>x.naturalWidth>0).length+'/'+i.length}</script>"
    )
    (tmp_path / "probe.html").write_text(page.replace("</body>", probe + "</body>"))
    (tmp_path / "report.html").write_text(page)
    args = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([*args, "--dump-dom", (tmp_path / "probe.html").as_uri()], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert "<title>4/4</title>" in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "report.png"
    size = "--window-size=1100,2400"
    run = subprocess.run([*args, f"--screenshot={shot}", size, (tmp_path / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    console = [ln for ln in (dom.stderr + run.stderr).splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    assert shot.is_file() and shot.read_bytes()[:4] == b"\x89PNG"
