"""``--model.optim.max_grad_norm``: the one gradient-clipping knob, with and without GradCache.

What is checked is the gradient the optimiser steps with (its total 2-norm), not parameters after an AdamW
step: Adam's update is about ``lr * sign(g)``, blind to a clipped gradient.
"""

from __future__ import annotations

import pytest
import torch

import tests._training as T
from alignment import strategies

LIMIT = 1e-3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return T.make_corpus(tmp_path_factory.mktemp("corpus"), rows=96, rows_per_shard=24)


def _stepped_norms(corpus, root, monkeypatch, max_grad_norm, chunk_size) -> list[float]:
    """Total gradient 2-norm at each ``AdamW.step`` of a 2-step fit."""
    norms: list[float] = []
    original = torch.optim.AdamW.step

    def step(self, closure=None):
        loss = None
        if closure is not None:  # automatic optimisation: backward (and Lightning's clipping hook) run in here
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        original(self)
        return loss

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    module = T.module(corpus, optim={"max_grad_norm": max_grad_norm}, gradcache={"chunk_size": chunk_size})
    T.trainer(root, max_steps=2).fit(module, datamodule=T.datamodule(corpus))
    return norms


@pytest.mark.parametrize("chunk_size", [0, 7], ids=["plain", "gradcache"])
def test_max_grad_norm_clips_the_gradient_the_optimiser_steps_with(corpus, tmp_path, monkeypatch, chunk_size):
    free = _stepped_norms(corpus, tmp_path / "free", monkeypatch, None, chunk_size)
    assert len(free) == 2 and min(free) > 10 * LIMIT  # the limit below binds: the test has power
    clipped = _stepped_norms(corpus, tmp_path / "clipped", monkeypatch, LIMIT, chunk_size)
    assert len(clipped) == 2
    assert all(n == pytest.approx(LIMIT, rel=1e-3) for n in clipped), clipped


def test_lightnings_gradient_clip_val_is_refused_naming_the_knob(corpus, tmp_path):
    trainer = T.trainer(tmp_path, gradient_clip_val=1.0)
    with pytest.raises(ValueError, match=r"--trainer.gradient_clip_val.*--model.optim.max_grad_norm"):
        trainer.fit(T.module(corpus), datamodule=T.datamodule(corpus))


def test_deepspeed_gets_max_grad_norm_as_its_gradient_clipping():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    ds = DeepSpeedStrategy(stage=2)
    ds.config["gradient_clipping"] = 0.0  # what Lightning writes from an unset gradient_clip_val
    strategies.deepspeed_clipping(ds, 0.5)
    assert ds.config["gradient_clipping"] == 0.5 and strategies.clips_in_engine(ds)
    ds.config["gradient_clipping"] = 2.0
    with pytest.raises(ValueError, match="--model.optim.max_grad_norm 0.5 conflicts"):
        strategies.deepspeed_clipping(ds, 0.5)
    assert not strategies.clips_in_engine(DDPStrategy())
