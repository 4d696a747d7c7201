"""The extra objectives at world size 2: ``AlignmentModule`` under Lightning's DDP on gloo, CPU, float64.

As ``test_module_ddp.py``: two ranks each fit one step on their own uneven local batch and capture the
gradients handed to the optimiser (after DDP's averaging, or the GradCache path's own); the test process
computes the same module's loss over the concatenated global batch in one process and requires every
gradient -- the encoder's and the language discriminator's -- to agree to a relative 1e-9, and the logged
``train/loss`` to be the one-process loss. Every term normalises by a count over the global batch; the
neighbourhood term also scores against the gathered candidates (and gathers the reference's embeddings).
The last case runs all four terms together through GradCache with a learned temperature.
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
ADV = {"weight": 0.5, "ramp": "constant", "num_languages": len(T.LANGUAGES), "dropout": 0.0, "hidden_dim": 16}
CASES = {  # few cases (each is one fit on both ranks): every term alone or in pairs, then all through GradCache
    "adversarial_matryoshka": dict(adversarial=ADV, matryoshka={"dims": [8, 16], "weights": [0.5, 1.0]}),
    "neighbourhood": dict(neighbourhood={"weight": 1.0, "temperature": 0.1}),
    "distill_cosine_alone": dict(distill={"teacher": "TEACHER", "kind": "cosine", "contrastive_weight": 0.0}),
    "all_gradcache": dict(adversarial=ADV, neighbourhood={"weight": 1.0}, distill={"teacher": "TEACHER"},
                          matryoshka={"dims": [8, 16]}, loss={"learn_temperature": True},
                          gradcache={"chunk_size": 4}),
}


def rank_rows(rank: int):
    return list(synthetic_rows(ROWS[rank], T.LANGUAGES, seed=50 + rank, missing_prob=0.3))


def make_teacher(folder: Path, vocab_size: int) -> str:
    from alignment.model import DualEncoder

    torch.manual_seed(123)
    DualEncoder.from_config(DualEncoder.tiny_config(vocab_size)).save_pretrained(folder)
    tiny_tokenizer(save_dir=folder)
    return str(folder)


def build_module(case: str, teacher: str, **overrides):
    from alignment.gradcache import GradCacheConfig
    from alignment.losses import LossConfig
    from alignment.model import ModelConfig
    from alignment.module import AlignmentModule, StepConfig
    from alignment.objectives import AdversarialConfig, DistillConfig, MatryoshkaConfig, NeighbourhoodConfig
    from alignment.optim import OptimConfig

    spec = {**CASES[case], **overrides}
    distill = {k: (teacher if v == "TEACHER" else v) for k, v in spec.get("distill", {}).items()}
    torch.manual_seed(7)
    module = AlignmentModule(
        ModelConfig(name_or_path="tiny", vocab_size=len(tiny_tokenizer())), LossConfig(**spec.get("loss", {})),
        OptimConfig(lr=1e-3, warmup_steps=1), GradCacheConfig(**spec.get("gradcache", {})),
        StepConfig(**spec.get("step", {})), adversarial=AdversarialConfig(**spec.get("adversarial", {})),
        neighbourhood=NeighbourhoodConfig(**spec.get("neighbourhood", {})), distill=DistillConfig(**distill),
        matryoshka=MatryoshkaConfig(**spec.get("matryoshka", {})),
    )
    for m in module.modules():  # dropout off: both sides must run the same network
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return module


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def worker(rank: int, world: int, out: str, teacher: str) -> None:
    import os

    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    batch = rows_to_batch(tiny_tokenizer(), rank_rows(rank), T.LANGUAGES)

    class Capture(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads = _grads(pl_module)
            self.optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
            self.discriminator = [id(p) for p in pl_module.objectives.parameters()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.loss = float(trainer.callback_metrics["train/loss"])

    for case in CASES:
        module = build_module(case, teacher)
        capture = Capture()
        trainer = Trainer(accelerator="cpu", devices=world, strategy=DDPStrategy(process_group_backend="gloo"),
                          max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                          use_distributed_sampler=False, default_root_dir=out, precision="64-true",
                          callbacks=[capture])
        trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None, collate_fn=lambda b: b))
        assert all(p in capture.optimised for p in capture.discriminator), "discriminator not optimised"
        torch.save({"grads": capture.grads, "loss": capture.loss}, Path(out) / f"{case}-rank{rank}.pt")


@pytest.fixture(scope="module")
def world_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("objectives_ddp")
    teacher = make_teacher(out / "teacher", len(tiny_tokenizer()))
    run_world(worker, WORLD, str(out), teacher, timeout=300,
              preload=("lightning.pytorch", "transformers", "tests.distributed.test_objectives_ddp"))
    return out, teacher


def single_process(case: str, teacher: str):
    from alignment.losses import total_loss

    module = build_module(case, teacher, gradcache={}).double()  # the plain step over the whole batch
    if module._reference is not None:
        module._reference.double()
    module.objectives.teacher_to(torch.device("cpu"), torch.float64)
    batch = rows_to_batch(tiny_tokenizer(), rank_rows(0) + rank_rows(1), T.LANGUAGES)
    loss = total_loss(module._loss_terms(module._encode(batch), batch))
    loss.backward()
    return float(loss.detach()), _grads(module)


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_gradients_equal_one_process_over_the_global_batch(world_results, case):
    out, teacher = world_results
    loss, expected = single_process(case, teacher)
    if "adversarial" in CASES[case]:
        assert any(n.startswith("objectives.discriminator.") for n in expected)
    for rank in range(WORLD):
        got = torch.load(out / f"{case}-rank{rank}.pt")
        assert got["grads"].keys() == expected.keys()
        scale = max(float(g.abs().max()) for g in expected.values())
        for name, grad in expected.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=RTOL, atol=RTOL * scale,
                                       msg=lambda m, n=name, r=rank: f"{case} rank {r} {n}: {m}")
        assert got["loss"] == pytest.approx(loss, rel=1e-9)
