"""NF4 in bitsandbytes' format (`--scheme nf4`): exact packing; what our round-to-nearest writes is byte for byte
what bitsandbytes itself writes; a GPTQ checkpoint reloads through transformers + bitsandbytes in a fresh process
with weights bit for bit ours."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from compress.errors import UsageError
from compress.eval import size
from compress.formats import bnb_nf4
from compress.primitives.qparams import dequantize
from tests.formats.test_tiny_models import quantize

pytest.importorskip("bitsandbytes")


def test_pack_round_trip_is_exact():
    q = torch.randint(0, 16, (48, 128), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = bnb_nf4.pack(q)
    assert packed.shape == (48 * 64, 1) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == int(q[0, 0]) * 16 + int(q[0, 1])  # the first code in the high nibble
    assert torch.equal(bnb_nf4.unpack(packed, (48, 128)), q)


BNB_SAVE = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=cfg, dtype=torch.bfloat16).save_pretrained(
    sys.argv[2]
)
"""


def tensors(d) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def test_round_to_nearest_writes_what_bitsandbytes_writes(tiny_model, tmp_path):
    """Our writer is bitsandbytes' format: round to nearest gives its bytes exactly, tensor for tensor."""
    src = tiny_model("llama")
    ours = tmp_path / "ours"
    quantize(src, ours, "nf4", group_size=64, method="rtn")  # without data NF4 keeps min/max by default
    proc = subprocess.run([sys.executable, "-c", BNB_SAVE, str(src), str(tmp_path / "bnb")], capture_output=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = tensors(ours), tensors(tmp_path / "bnb")
    quantized = [k for k in b if k.endswith(".weight.absmax")]
    assert len(quantized) == 14 and set(a) == set(b)
    for k in sorted(b):
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ours_qc = json.loads((ours / "config.json").read_text())["quantization_config"]
    assert ours_qc["quant_method"] == "bitsandbytes" and ours_qc["bnb_4bit_quant_type"] == "nf4"
    assert ours_qc["llm_int8_skip_modules"] == ["lm_head"]


RELOAD = """
import json, sys, torch
from bitsandbytes.functional import dequantize_4bit
from bitsandbytes.nn import Linear4bit
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).eval()
lins = {n: mod for n, mod in m.named_modules() if isinstance(mod, Linear4bit)}
w = {n: dequantize_4bit(mod.weight.data, mod.weight.quant_state) for n, mod in lins.items()}
ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = m(ids).logits.float()
torch.save({"weights": w, "logits": logits}, sys.argv[2])
"""


def test_gptq_checkpoint_reloads_bit_for_bit_through_bitsandbytes(tiny_model, tmp_path):
    src, out = tiny_model("llama"), tmp_path / "nf4"
    report = quantize(src, out, "nf4", samples=4, seq_len=64)
    assert report.stages[0].settings["method"] == "gptq" and report.stages[0].settings["group_size"] == 64
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(out), str(tmp_path / "got.pt")], capture_output=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(tmp_path / "got.pt")
    stored = tensors(out)
    assert len(got["weights"]) == 14
    for name, w in got["weights"].items():
        q = bnb_nf4.unpack(stored[f"{name}.weight"], tuple(w.shape))
        absmax = stored[f"{name}.weight.absmax"]
        assert absmax.dtype == torch.float32
        ours = dequantize(q, absmax.reshape(w.shape[0], -1), torch.zeros(())).to(torch.bfloat16)
        assert torch.equal(ours, w), name
    # the model computes: logits close to the base's (a random tiny model: a loose bound; SmolLM2 is benchmarked)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits.float()
    assert torch.isfinite(got["logits"]).all()
    rel = float((got["logits"] - ref).norm() / ref.norm())
    assert rel < 0.2, rel
    # 4 bits and a float32 absmax a block of 64, plus each linear's 16-value code and its JSON state
    bits = size.bits_per_weight(out, sorted(got["weights"]))
    assert 4.5 < bits < 4.75, bits


def test_mixture_of_experts_is_refused(tiny_model, tmp_path):
    """transformers loads experts fused and bitsandbytes quantizes only linears: per-expert NF4 would not load."""
    with pytest.raises(UsageError, match="nf4 on a mixture of experts"):
        quantize(tiny_model("qwen3_moe"), tmp_path / "o", "nf4")
    assert not (tmp_path / "o").exists()
