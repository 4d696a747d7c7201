"""The production step at world size 2: ``AlignmentModule`` under Lightning's DDP on gloo, CPU.

Two real ranks (``_spawn.run_world``) each run ``Trainer(strategy=DDPStrategy, devices=2,
precision="64-true").fit`` for one step on their own local batch (uneven: 3 rows on rank 0, 5 on
rank 1, languages missing at random), and capture the parameter gradients Lightning hands to the
optimiser (``on_before_optimizer_step``, after DDP's averaging or the GradCache path's own). The
test process computes the loss of the *same* module over the concatenated global batch in one
process, back-propagates, and requires every gradient to agree to a relative 1e-9 (float64), and
the logged ``train/loss`` to be that single-process loss. Cases: plain multi-way, En-X, the drift
regulariser, margin with a learned temperature, the GradCache path (which switches DDP's sync
off and averages by hand), and length-grouped encoding (``--model.step.token_budget``, plain, drift and
GradCache) and packed encoding (``--model.step.unpadded on``, with drift) against the one process's single
padded forward. Dropout is off so both sides run the same network.

The same world then fits 4 steps with the real datamodule, checkpoint, preemption and throughput
callbacks, and counts every ``torch.distributed`` collective per step against the budget written in
``alignment/module.py``; and the host reads (device syncs) ``ThroughputLogger`` makes per step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _spawn import run_world

from alignment.synthetic import rows_to_batch, synthetic_rows, tiny_tokenizer
from tests import _training as T

pytestmark = pytest.mark.distributed

WORLD = 2
ROWS = (3, 5)  # uneven local batches
RTOL = 1e-9
CASES = {
    "multiway": dict(loss={"objective": "multi_positive"}),
    "en_x": dict(loss={"objective": "en_x"}),
    "drift": dict(loss={"objective": "multi_positive", "drift_weight": 0.5}),
    "margin_learned_temperature": dict(loss={"objective": "multi_positive", "margin": 0.3, "learn_temperature": True}),
    "gradcache": dict(loss={"objective": "multi_positive", "learn_temperature": True}, gradcache={"chunk_size": 4}),
    # length-grouped encoding (alignment/encode.py) with a budget that splits every local batch into several
    # chunks; the one-process reference below always runs the single padded forward (token_budget None)
    "grouped": dict(loss={"objective": "multi_positive"}, step={"token_budget": 24}),
    "grouped_drift": dict(loss={"objective": "multi_positive", "drift_weight": 0.5}, step={"token_budget": 24}),
    "grouped_gradcache": dict(loss={"objective": "multi_positive", "learn_temperature": True},
                              gradcache={"chunk_size": 4}, step={"token_budget": 24}),
    # packed encoding (alignment/packing.py, sdpa_varlen's exact reference on CPU): one sequence per rank's batch
    "packed_drift": dict(loss={"objective": "multi_positive", "drift_weight": 0.5},
                         encoder={"attn_implementation": "sdpa_varlen"}, step={"unpadded": "on", "token_budget": 0}),
}
COUNT_STEPS, COUNT_LOG_EVERY = 4, 2


# ---------------------------------------------------------------------------- data and module, same everywhere


def _tokenizer():
    return tiny_tokenizer()


def rank_rows(rank: int):
    return list(synthetic_rows(ROWS[rank], T.LANGUAGES, seed=50 + rank, missing_prob=0.3))


def build_module(tokenizer, case: str, **overrides):
    module = T.module(T.Corpus(Path("."), Path("."), len(tokenizer)), seed=7, **{**CASES[case], **overrides})
    for m in module.modules():  # dropout off: both sides must run the same network
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return module


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------- rank side


def _trainer(root: Path, **kwargs):
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import DDPStrategy

    defaults = dict(accelerator="cpu", devices=WORLD, strategy=DDPStrategy(process_group_backend="gloo"),
                    max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                    use_distributed_sampler=False, default_root_dir=str(root))
    defaults.update(kwargs)
    return Trainer(**defaults)


def _gradient_cases(rank: int, out: Path) -> None:
    from lightning.pytorch import Callback
    from torch.utils.data import DataLoader

    tokenizer = _tokenizer()
    batch = rows_to_batch(tokenizer, rank_rows(rank), T.LANGUAGES)

    class Capture(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads = _grads(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.loss = float(trainer.callback_metrics["train/loss"])

    for case in CASES:
        module = build_module(tokenizer, case)
        capture = Capture()
        trainer = _trainer(out, precision="64-true", callbacks=[capture])
        trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None, collate_fn=lambda b: b))
        torch.save({"grads": capture.grads, "loss": capture.loss}, out / f"{case}-rank{rank}.pt")


class _Collectives:
    """Counts calls of every ``torch.distributed`` collective (outermost call only), per step window."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
             "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "barrier", "all_gather_object",
             "broadcast_object_list", "all_to_all", "all_to_all_single", "reduce", "gather", "scatter",
             "_broadcast_coalesced", "all_reduce_coalesced", "monitored_barrier")

    def __init__(self):
        self.windows: list[dict[str, int]] = [{}]
        self._depth = 0

    def install(self) -> None:
        import torch.distributed as dist

        import alignment.distributed as ad

        for name in self.NAMES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))
        # bound at import time in alignment.distributed
        ad._ALL_GATHER = self._wrap("all_gather_into_tensor", ad._ALL_GATHER)
        ad._REDUCE_SCATTER = self._wrap("reduce_scatter_tensor", ad._REDUCE_SCATTER)

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if self._depth == 0:
                window = self.windows[-1]
                window[name] = window.get(name, 0) + 1
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted


def _collective_budget(rank: int, out: Path, shards: str, tokenizer_dir: str, vocab_size: int) -> None:
    from lightning.pytorch import Callback
    from torch.overrides import TorchFunctionMode

    from alignment.callbacks import AtomicModelCheckpoint, ThroughputLogger
    from alignment.preemption import PreemptionCheckpoint

    counter = _Collectives()
    host_reads: list[list[str]] = []

    class HostReads(TorchFunctionMode):
        """Tensor -> Python reads: on a GPU each is a device-to-host sync."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy"):
                host_reads[-1].append(name)
            return func(*args, **(kwargs or {}))

    class CountedThroughput(ThroughputLogger):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            host_reads.append([])
            with HostReads():
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    class Windows(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            counter.windows.append({})  # everything from here to the next batch start is this step's

        def on_train_end(self, trainer, pl_module):
            counter.windows.append({})

    corpus = T.Corpus(Path(shards), Path(tokenizer_dir), vocab_size)
    module = T.module(corpus)
    callbacks = [Windows(), CountedThroughput(), PreemptionCheckpoint(),
                 AtomicModelCheckpoint(dirpath=str(out / "ckpt"), every_n_train_steps=1000, save_last=False)]
    trainer = _trainer(out, max_steps=COUNT_STEPS, log_every_n_steps=COUNT_LOG_EVERY, callbacks=callbacks,
                       enable_checkpointing=True)
    counter.install()
    trainer.fit(module, datamodule=T.datamodule(corpus, batch_size=6))
    # windows: [before fit, step 0 .. step n-1, after the last step]
    (out / f"collectives-rank{rank}.json").write_text(json.dumps({"steps": counter.windows[1:-1],
                                                                  "host_reads": host_reads}))


def worker(rank: int, world: int, out: str, shards: str, tokenizer_dir: str, vocab_size: int) -> None:
    import os

    # Lightning joins the process group run_world already initialised (an external launcher, as torchrun).
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    out = Path(out)
    _gradient_cases(rank, out)
    _collective_budget(rank, out, shards, tokenizer_dir, vocab_size)


# ---------------------------------------------------------------------------- test side


@pytest.fixture(scope="module")
def world_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    corpus = T.make_corpus(out / "data", rows=120, rows_per_shard=20)
    run_world(worker, WORLD, str(out), str(corpus.shards), str(corpus.tokenizer), corpus.vocab_size,
              timeout=300, preload=("lightning.pytorch", "transformers", "tests.distributed.test_module_ddp"))
    return out


def single_process(case: str):
    """Loss and gradients of the same module over the concatenated global batch, in this one process."""
    from alignment.losses import total_loss

    tokenizer = _tokenizer()
    module = build_module(tokenizer, case, step={"token_budget": None}).double()  # one padded forward
    if module._reference is not None:
        module._reference.double()
    batch = rows_to_batch(tokenizer, rank_rows(0) + rank_rows(1), T.LANGUAGES)  # rank 0's rows, then rank 1's
    loss = total_loss(module._loss_terms(module._encode(batch), batch))
    loss.backward()
    return float(loss.detach()), _grads(module)


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_step_gradients_equal_one_process_over_the_global_batch(world_results, case):
    loss, expected = single_process(case)
    for rank in range(WORLD):
        got = torch.load(world_results / f"{case}-rank{rank}.pt")
        assert got["grads"].keys() == expected.keys()
        # Relative to the gradient's scale: some gradients are 0 in exact arithmetic (attention key biases,
        # softmax-invariant) and only float64 rounding noise (1e-20) on both sides.
        scale = max(float(g.abs().max()) for g in expected.values())
        for name, grad in expected.items():
            assert got["grads"][name].dtype == torch.float64, name
            torch.testing.assert_close(got["grads"][name], grad, rtol=RTOL, atol=RTOL * scale,
                                       msg=lambda m, n=name, r=rank: f"{case} rank {r} {n}: {m}")
        # train/loss is the global loss, the one process's loss over the whole batch
        assert got["loss"] == pytest.approx(loss, rel=1e-9)


def test_collectives_per_step_within_the_budget(world_results):
    """The budget of ``alignment/module.py``: per step the loss's gather (3 all-gathers, 1 reduce-scatter in
    backward), one small all-reduce for the step guard (NaN + preemption + global loss, counters on logging
    steps), Lightning's per-batch SIGTERM broadcast, nothing else (DDP's gradient all-reduce is its C++
    reducer's, not a Python call, so not counted here); ThroughputLogger reads the device only on logging
    steps."""
    for rank in range(WORLD):
        recorded = json.loads((world_results / f"collectives-rank{rank}.json").read_text())
        steps = recorded["steps"]
        assert len(steps) == COUNT_STEPS, steps
        for step, counts in enumerate(steps):
            logging = (step + 1) % COUNT_LOG_EVERY == 0
            assert counts.get("all_reduce", 0) == 1, f"rank {rank} step {step} (logging={logging}): {counts}"
            assert counts.get("all_gather_into_tensor", 0) == 3, f"rank {rank} step {step}: {counts}"
            assert counts.get("reduce_scatter_tensor", 0) == 1, f"rank {rank} step {step}: {counts}"
            # Lightning's own: one 1-int broadcast before each batch (its SIGTERM check, world > 1)
            assert counts.get("broadcast", 0) <= 1, f"rank {rank} step {step}: {counts}"
            others = {k: v for k, v in counts.items()
                      if k not in ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")}
            assert not others, f"rank {rank} step {step}: unbudgeted collectives {others}"
        reads = recorded["host_reads"]
        assert len(reads) == COUNT_STEPS
        for step, names in enumerate(reads):
            logging = (step + 1) % COUNT_LOG_EVERY == 0
            assert len(names) <= (1 if logging else 0), f"rank {rank} step {step}: ThroughputLogger read {names}"
