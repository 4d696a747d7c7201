"""LoRA and language adapters at world size 2: ``AlignmentModule`` under Lightning's DDP on gloo, CPU, float64.

As ``test_module_ddp.py``: two real ranks each fit one step on their own uneven local batch and capture the
gradients handed to the optimiser; the test process computes the same module's loss over the concatenated
global batch in one process and requires every trainable (adapter) gradient to agree to a relative 1e-9.
Cases: LoRA, LoRA with the drift regulariser (reference = the adapter-free base), LoRA under GradCache,
language adapters (sentences routed to their group's adapter; a rank whose batch lacks a group still gives
that adapter a zero gradient, so DDP's reducer sees every parameter) and language adapters under GradCache.
The adapters' ``lora_B`` start at random values (peft starts them at zero, where ``lora_A``'s gradient is 0).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _spawn import run_world

from alignment.synthetic import rows_to_batch, synthetic_rows, tiny_tokenizer
from tests import _training as T

pytestmark = pytest.mark.distributed

WORLD = 2
ROWS = (3, 5)
RTOL = 1e-9
LORA = {"method": "lora", "target_modules": ["query", "key", "value", "dense"]}
GROUPS = {"language_groups": {"de": "germanic", "fr": "romance", "es": "romance"}}
CASES = {
    "lora": dict(encoder={"adapter": LORA, "projection_dim": 16}),
    "lora_drift": dict(encoder={"adapter": LORA, "projection_dim": 16},
                       loss={"objective": "multi_positive", "drift_weight": 0.5}),
    "lora_gradcache": dict(encoder={"adapter": LORA}, gradcache={"chunk_size": 4}, step={"token_budget": 24}),
    "language": dict(encoder={"adapter": {**LORA, **GROUPS}}, step={"token_budget": 24}),
    "language_gradcache": dict(encoder={"adapter": {**LORA, **GROUPS}}, gradcache={"chunk_size": 4}),
}


def rank_rows(rank: int):
    return list(synthetic_rows(ROWS[rank], T.LANGUAGES, seed=60 + rank, missing_prob=0.3))


def build_module(tokenizer, case: str, **overrides):
    module = T.module(T.Corpus(Path("."), Path("."), len(tokenizer)), seed=7, **{**CASES[case], **overrides})
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return module


def worker(rank: int, world: int, out: str) -> None:
    import os

    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    tokenizer = tiny_tokenizer()
    batch = rows_to_batch(tokenizer, rank_rows(rank), T.LANGUAGES)

    class Capture(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    for case in CASES:
        capture = Capture()
        trainer = Trainer(accelerator="cpu", devices=WORLD, strategy=DDPStrategy(process_group_backend="gloo"),
                          max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                          use_distributed_sampler=False, default_root_dir=out, precision="64-true",
                          callbacks=[capture])
        trainer.fit(build_module(tokenizer, case),
                    train_dataloaders=DataLoader([batch], batch_size=None, collate_fn=lambda b: b))
        torch.save(capture.grads, Path(out) / f"{case}-rank{rank}.pt")


@pytest.fixture(scope="module")
def world_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters-ddp")
    run_world(worker, WORLD, str(out), timeout=300,
              preload=("lightning.pytorch", "transformers", "peft", "tests.distributed.test_adapters_ddp"))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_gradients_equal_one_process_over_the_global_batch(world_results, case):
    from alignment.losses import total_loss

    tokenizer = tiny_tokenizer()
    module = build_module(tokenizer, case, step={"token_budget": None}).double()
    if module._reference is not None:
        module._reference.to(dtype=torch.float64)
    batch = rows_to_batch(tokenizer, rank_rows(0) + rank_rows(1), T.LANGUAGES)
    total_loss(module._loss_terms(module._encode(batch), batch)).backward()
    expected = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert expected and all(".lora_" in n or n.startswith("encoder.projection") for n in expected)
    scale = max(float(g.abs().max()) for g in expected.values())
    for rank in range(WORLD):
        got = torch.load(world_results / f"{case}-rank{rank}.pt")
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=RTOL, atol=RTOL * scale,
                                       msg=lambda m, n=name, r=rank: f"{case} rank {r} {n}: {m}")
