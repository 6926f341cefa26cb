"""The distill stage's choices before training: the autocast resolved from the option and the machine."""

import pytest

from compress import recipe
from compress.distill import stage
from compress.recipe import DistillStage


@pytest.mark.parametrize(
    "asked, fast, expected",
    [("auto", True, "bf16"), ("auto", False, "no"), ("bf16", False, "bf16"), ("off", True, "no")],
)
def test_autocast_by_option_else_by_measured_speed(monkeypatch, asked, fast, expected):
    """auto: bfloat16 where it multiplies faster (compute.half_is_fast, measured on a CPU); bf16 and off as asked."""
    seen = []
    monkeypatch.setattr(recipe, "half_is_fast", lambda dtype, device: seen.append((str(dtype), device)) or fast)
    accelerator = stage.accelerator_for(DistillStage(autocast=asked), "cpu")
    assert accelerator.mixed_precision == expected
    assert seen == ([("torch.bfloat16", "cpu")] if asked == "auto" else [])
