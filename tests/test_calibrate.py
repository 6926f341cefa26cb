"""The layer-by-layer runner's helpers."""

import torch

from compress.calibrate import SharedReaders


def test_linears_reading_the_same_tensor_share_an_owner():
    shared = SharedReaders()
    x, y = torch.ones(2, 4), torch.ones(2, 4)  # equal values, different tensors
    for _ in range(2):  # two batches
        shared.next_batch()
        assert [shared.reader(n, x) for n in ("q", "k", "v")] == ["q", "q", "q"]
        assert shared.reader("o", y) == "o"
        x, y = torch.ones(2, 4), torch.ones(2, 4)
    assert shared.groups(["q", "k", "v", "o", "never_run"]) == {
        "q": ["q", "k", "v"],
        "o": ["o"],
        "never_run": ["never_run"],
    }


def test_float_stream_carries_the_unchanged_models_hidden_states(tiny_model):
    """With `float_stream`, each layer sees the unchanged model's hidden state after it as
    `inputs.reference`, while its inputs are what the changed layers before it produced."""
    from transformers import AutoModelForCausalLM

    from compress.calibrate import layer_by_layer

    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32).eval()
    batches = [torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        want = [model(b, output_hidden_states=True).hidden_states for b in batches]  # [embeddings, layer 0, ...]
    seen = []

    def calibrate(i, layer, inputs):
        seen.append(([h.clone() for h in inputs.hidden], [r.clone() for r in inputs.reference]))
        with torch.no_grad():
            layer.mlp.down_proj.weight.mul_(0.5)  # the layer changes: the next one's inputs differ

    layer_by_layer(model, batches, torch.device("cpu"), calibrate, float_stream=True)
    (hidden0, ref0), (hidden1, ref1) = seen
    for b in range(2):
        assert torch.allclose(hidden0[b], want[b][0]) and torch.allclose(ref0[b], want[b][1], atol=1e-5)
        with torch.no_grad():  # transformers' last hidden state is after the final norm (left unchanged)
            assert torch.allclose(model.model.norm(ref1[b]), want[b][2], atol=1e-5)
        assert not torch.allclose(hidden1[b], want[b][1], atol=1e-3)  # the changed layer 0's outputs
