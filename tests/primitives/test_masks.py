import pytest
import torch

from compress.primitives.masks import keep_n_of_m, keep_top, n_of_m_holds, parse_pattern


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_n_of_m_keeps_exactly_n_largest_per_group(n, m):
    torch.manual_seed(0)
    score = torch.rand(16, 64)
    mask = keep_n_of_m(score, n, m)
    assert (mask.reshape(16, -1, m).sum(-1) == n).all()
    kept_min = torch.where(mask, score, 2.0).reshape(16, -1, m).amin(-1)
    dropped_max = torch.where(mask, -1.0, score).reshape(16, -1, m).amax(-1)
    assert (kept_min > dropped_max).all()
    assert n_of_m_holds(score * mask, n, m) and not n_of_m_holds(score, n, m)


@pytest.mark.parametrize("per_row", [True, False])
def test_keep_top_drops_the_share_asked(per_row):
    score = torch.rand(10, 100)
    mask = keep_top(score, 0.3, per_row)
    assert float(1 - mask.float().mean()) == pytest.approx(0.3, abs=0.01)
    if per_row:
        assert (mask.sum(1) == 70).all()
    assert score[mask].min() >= (score[~mask].max() if not per_row else 0)


@pytest.mark.parametrize("bad", ["4:4", "5:4", "0:4", "2-4", "two:four"])
def test_bad_patterns(bad):
    with pytest.raises(ValueError):
        parse_pattern(bad)


def test_widths_not_divisible_by_m():
    with pytest.raises(ValueError, match="divisible by 8"):
        keep_n_of_m(torch.rand(4, 12), 4, 8)
