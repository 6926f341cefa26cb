import json

import pytest
import torch
from safetensors.torch import load_file

from compress.formats import sparse


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(7, 13), (64, 576)])
def test_pack_unpack_is_bit_identical(dtype, shape):
    torch.manual_seed(0)
    w = torch.randn(*shape).to(dtype)
    w[torch.rand(*shape) < 0.5] = 0
    p = sparse.pack(w)
    assert p["weight_bitmask"].dtype == torch.uint8 and p["weight_bitmask"].shape == (shape[0], -(-shape[1] // 8))
    back = sparse.unpack(p)
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), w.view(torch.uint8))


def test_bf16_exponent_codes_with_escapes():
    """More than 15 exponents in one tensor: the rare ones go through the escape list, exactly."""
    torch.manual_seed(0)
    w = (torch.randn(32, 64) * torch.exp2(torch.randint(-40, 10, (32, 64)).float())).to(torch.bfloat16)
    w[0, :5] = torch.tensor([float("inf"), -float("inf"), 1e-40, -1e-40, 3.0])  # specials and subnormals
    p = sparse.pack(w)
    assert len(p["weight_exptable"]) == 15 and len(p["weight_expescapes"]) > 0
    assert p["weight_signmant"].numel() + p["weight_expcodes"].numel() < 1.51 * w.numel()
    assert torch.equal(sparse.unpack(p).view(torch.int16), w.view(torch.int16))


def test_checkpoint_round_trip_with_shards(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    for n in names:
        w = model.get_submodule(n).weight
        w.data[torch.rand(w.shape) < 0.5] = 0
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="2MB")  # several shards and an index
    dense = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(f).items()}
    sparse.record(src, {"storage": "sparse", "sparsity": 0.5})
    sparse.compress_checkpoint(src, names)
    assert sparse.is_sparse(src)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    assert f"{names[0]}.weight_bitmask" in index and f"{names[0]}.weight" not in index
    back = sparse.densify(src, tmp_path / "dense")
    again = {k: v for f in sorted(back.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert again.keys() == dense.keys() and all(torch.equal(again[k], dense[k]) for k in dense)
    assert not sparse.is_sparse(back)
