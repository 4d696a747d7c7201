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

from alignment.synthetic import rows_to_batch, synthetic_rows, tiny_tokenizer
from tests import _training as T
from tests.distributed._spawn import run_world

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


# ---------------------------------------------------------------------------- DeepSpeed ZeRO (CPU, gloo)


def deepspeed_worker(spec_file: str) -> None:
    """One rank (launched as torchrun would): ZeRO-3 (every parameter partitioned; ZeRO-1/2 partition less), 3 steps
    with the adversarial, neighbourhood and Matryoshka terms; the discriminator is sized from the data module's
    vocabulary at set-up, before DeepSpeed wraps it. Rank 0 records the discriminator before and after."""
    import json
    import os

    from lightning.pytorch import Callback, Trainer

    from alignment.gradcache import GradCacheConfig
    from alignment.losses import LossConfig
    from alignment.model import ModelConfig
    from alignment.module import AlignmentModule, StepConfig
    from alignment.objectives import AdversarialConfig, MatryoshkaConfig, NeighbourhoodConfig
    from alignment.optim import OptimConfig

    spec = json.loads(Path(spec_file).read_text())
    corpus = T.Corpus(Path(spec["shards"]), Path(spec["tokenizer"]), spec["vocab_size"])
    for stage in (3,):

        class Record(Callback):
            def __init__(self):
                self.losses, self.weights = [], {}

            def _gathered(self, module, zero3=stage == 3):
                import deepspeed

                params = list(module.objectives.parameters())
                with deepspeed.zero.GatheredParameters(params, enabled=zero3):
                    return [p.detach().clone() for p in params]

            def on_train_start(self, trainer, pl_module):
                self.weights["start"] = self._gathered(pl_module)

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.losses.append({k: float(v) for k, v in trainer.callback_metrics.items()
                                    if k.startswith("train/")})

            def on_train_end(self, trainer, pl_module):
                self.weights["end"] = self._gathered(pl_module)

        torch.manual_seed(0)
        module = AlignmentModule(ModelConfig(name_or_path="tiny", vocab_size=corpus.vocab_size), LossConfig(),
                                 OptimConfig(lr=1e-3, warmup_steps=1), GradCacheConfig(), StepConfig(),
                                 adversarial=AdversarialConfig(weight=0.5, ramp="constant", hidden_dim=16),
                                 neighbourhood=NeighbourhoodConfig(weight=1.0), matryoshka=MatryoshkaConfig(dims=[8]))
        record = Record()
        strategy = T.CPUDeepSpeedStrategy(stage=stage, param_persistence_threshold=0 if stage == 3 else None,
                                          parallel_devices=[torch.device("cpu", i) for i in range(2)])
        trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy, precision="32-true", max_steps=3,
                          logger=False, enable_progress_bar=False, enable_model_summary=False,
                          enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                          log_every_n_steps=1, default_root_dir=spec["out"], callbacks=[record])
        trainer.fit(module, datamodule=T.datamodule(corpus, batch_size=8))
        if os.environ["RANK"] == "0":
            torch.save({"losses": record.losses, **record.weights}, Path(spec["out"]) / f"zero{stage}.pt")
        trainer.strategy.barrier("case-done")


@pytest.mark.slow
def test_deepspeed_zero3_trains_the_discriminator(tmp_path):
    import json
    import subprocess
    import sys

    from tests.distributed._spawn import free_port
    from tests.distributed.test_deepspeed_cpu import EXTENSIONS

    corpus = T.make_corpus(tmp_path / "data", rows=64, rows_per_shard=16)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"shards": str(corpus.shards), "tokenizer": str(corpus.tokenizer),
                                "vocab_size": corpus.vocab_size, "out": str(tmp_path)}))
    port, procs = str(free_port()), []
    for rank in range(WORLD):
        env = T.align_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                          NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, DS_ACCELERATOR="cpu",
                          TORCH_EXTENSIONS_DIR=EXTENSIONS)
        code = f"from tests.distributed.test_objectives_ddp import deepspeed_worker; deepspeed_worker({str(spec)!r})"
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path, stdout=log,
                                       stderr=subprocess.STDOUT), log.name))
    for proc, log in procs:
        assert proc.wait(timeout=400) == 0, Path(log).read_text()[-3000:]
    for stage in (3,):
        got = torch.load(tmp_path / f"zero{stage}.pt")
        assert len(got["losses"]) == 3
        for step in got["losses"]:
            for term in ("adversarial_loss", "adv_accuracy", "neighbourhood_loss", "matryoshka_loss"):
                assert torch.isfinite(torch.tensor(step[f"train/{term}"])), (stage, term, step)
        # the discriminator is optimised under ZeRO (its full weights, gathered, moved)
        moved = max(float((a - b).abs().max()) for a, b in zip(got["start"], got["end"]))
        assert moved > 1e-5, (stage, moved)
