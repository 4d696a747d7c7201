"""``alignment.optim``: the learning-rate schedule's warm-up."""

from __future__ import annotations

import pytest

from alignment.optim import OptimConfig, lr_lambda


def test_warmup_steps_zero_means_no_warmup():
    fn = lr_lambda(OptimConfig(warmup_steps=0, warmup_ratio=0.5, schedule="constant"), total_steps=100)
    assert [fn(s) for s in (0, 1, 49, 99)] == [1.0, 1.0, 1.0, 1.0]


def test_warmup_steps_unset_uses_the_ratio_and_set_overrides_it():
    ratio = lr_lambda(OptimConfig(warmup_ratio=0.1, schedule="constant"), total_steps=100)
    assert ratio(0) == pytest.approx(0.1) and ratio(9) == pytest.approx(1.0) and ratio(10) == 1.0
    steps = lr_lambda(OptimConfig(warmup_steps=4, warmup_ratio=0.1, schedule="constant"), total_steps=100)
    assert [steps(s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_negative_warmup_steps_is_refused():
    with pytest.raises(ValueError, match="--model.optim.warmup_steps"):
        OptimConfig(warmup_steps=-1)
