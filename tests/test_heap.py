import torch
from safetensors.torch import load_file

from compress import heap
from compress.models import load as loading, source as sources


def test_loaded_weights_are_not_file_mappings(tiny_model):
    """A compressed layer must give its memory back; pages of a mapped checkpoint would not."""
    src = sources.resolve(str(tiny_model("llama")))
    loaded = loading.load(src, "auto")
    maps = heap._file_mappings(".safetensors")
    params = dict(loaded.model.named_parameters())
    assert not any(s <= p.untyped_storage().data_ptr() < e for p in params.values() for s, e in maps)
    on_disk = load_file(src.path / "model.safetensors")
    assert all(torch.equal(params[k], v) for k, v in on_disk.items() if k in params)


def test_own_weights_leaves_other_tensors_alone():
    plain = torch.arange(5000, dtype=torch.float32)
    ptr = plain.data_ptr()
    heap.own_weights([plain])
    assert plain.data_ptr() == ptr and torch.equal(plain, torch.arange(5000, dtype=torch.float32))
