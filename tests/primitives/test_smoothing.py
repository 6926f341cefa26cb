import torch

from compress.primitives.smoothing import awq_candidates, fold, normalized_weight_mean, smoothquant_scales


def test_fold_norm_into_linears_keeps_outputs():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(16)
    norm.weight.data.uniform_(0.5, 2)
    norm.bias.data.normal_()
    lins = [torch.nn.Linear(16, 8), torch.nn.Linear(16, 4)]
    x = torch.randn(5, 16)
    before = [lin(norm(x)) for lin in lins]
    fold(norm, lins, torch.rand(16) * 4 + 0.1)
    after = [lin(norm(x)) for lin in lins]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(before, after))


def test_fold_linear_into_linear_through_relu_keeps_outputs():
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
    x = torch.randn(5, 8)
    before = fc2(torch.relu(fc1(x)))
    fold(fc1, [fc2], torch.rand(16) * 4 + 0.1)  # positive scales commute with ReLU
    assert torch.allclose(before, fc2(torch.relu(fc1(x))), atol=1e-5)


def test_smoothquant_scale_formula():
    x_max = torch.tensor([4.0, 1.0])
    w = [torch.tensor([[1.0, 4.0], [0.5, 2.0]])]
    s = smoothquant_scales(x_max, w, alpha=0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5]))  # sqrt(4/1), sqrt(1/4)


def test_awq_candidates_are_normalized():
    cands = awq_candidates(torch.rand(32) + 0.1, normalized_weight_mean([torch.randn(8, 32)], 16), 10)
    assert len(cands) == 10
    for s in cands:
        assert (s > 0).all() and torch.isclose(s.max() * s.min(), torch.tensor(1.0), rtol=1e-4)
