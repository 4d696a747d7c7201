"""LoRA and language adapters at world size 2: ``AlignmentModule`` under Lightning's DDP on gloo, CPU, float64.

As ``test_module_ddp.py``: two real ranks each fit one step on their own uneven local batch and capture the
gradients handed to the optimiser; the test process computes the same module's loss over the concatenated
global batch in one process and requires every trainable (adapter) gradient to agree to a relative 1e-9.
Cases (the drift cases include the plain gradient path): LoRA with the drift regulariser (reference = the
adapter-free base), LoRA under GradCache, language adapters (sentences routed to their group's adapter; a
rank whose batch lacks a group still gives that adapter a zero gradient, so DDP's reducer sees every
parameter) with drift and length-grouped chunks, and under GradCache.
The adapters' ``lora_B`` start at random values (peft starts them at zero, where ``lora_A``'s gradient is 0).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alignment.synthetic import rows_to_batch, synthetic_rows, tiny_tokenizer
from tests import _training as T
from tests.distributed._spawn import free_port, run_world

pytestmark = pytest.mark.distributed

WORLD = 2
ROWS = (3, 5)
RTOL = 1e-9
LORA = {"method": "lora", "target_modules": ["query", "key", "value", "dense"]}
GROUPS = {"language_groups": {"de": "germanic", "fr": "romance", "es": "romance"}}
CASES = {
    "lora_drift": dict(encoder={"adapter": LORA, "projection_dim": 16},
                       loss={"objective": "multi_positive", "drift_weight": 0.5}),
    "lora_gradcache": dict(encoder={"adapter": LORA}, gradcache={"chunk_size": 4}, step={"token_budget": 24}),
    "language_drift": dict(encoder={"adapter": {**LORA, **GROUPS}}, loss={"objective": "multi_positive",
                                                                            "drift_weight": 0.5},
                           step={"token_budget": 24}),
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


# ---------------------------------------------------------------------------- DeepSpeed ZeRO-2 on CPU


def deepspeed_worker(spec_path: str) -> None:
    """One rank of ``test_lora_under_deepspeed_zero2_exports_what_was_trained`` (a launcher-style process)."""
    import json
    import os

    from alignment.callbacks import ExportOnFitEnd
    from tests.distributed.test_deepspeed_cpu import TEXTS, _Probe, _trainer

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    corpus = T.Corpus(Path(spec["shards"]), Path(spec["tokenizer"]), spec["vocab_size"])
    tokenizer = T.datamodule(corpus).tokenizer
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    world = int(os.environ["WORLD_SIZE"])  # read once: the first fit's teardown clears it
    for name, adapter in (("lora", LORA), ("language", {**LORA, **GROUPS})):
        module = T.module(corpus, encoder={"adapter": adapter}, loss={"drift_weight": 0.1}, seed=0)
        probe = _Probe(enc["input_ids"], enc["attention_mask"], out / f"{name}-probe.pt")
        trainer = _trainer(2, world, out / name, 3,
                           [probe.callback, ExportOnFitEnd(dir=str(out / f"{name}-export"))])
        trainer.fit(module, datamodule=T.datamodule(corpus, batch_size=8))
        trainer.strategy.barrier("case-done")


@pytest.mark.slow
def test_lora_under_deepspeed_zero2_exports_what_was_trained(tmp_path):
    """LoRA (+ drift against the adapter-free base) under Lightning's DeepSpeed ZeRO-2 on 2 CPU ranks: it
    trains, and the end-of-fit export (merged) loads in sentence-transformers with the trained embeddings."""
    import json
    import subprocess
    import sys

    from sentence_transformers import SentenceTransformer

    from tests.distributed.test_deepspeed_cpu import COSINE, EXTENSIONS, TEXTS, _cosines


    corpus = T.make_corpus(tmp_path / "data", rows=64, rows_per_shard=16)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"shards": str(corpus.shards), "tokenizer": str(corpus.tokenizer),
                                "vocab_size": corpus.vocab_size, "out": str(tmp_path / "out")}))
    port, procs = str(free_port()), []
    for rank in range(WORLD):
        env = T.align_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                          NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, DS_ACCELERATOR="cpu",
                          TORCH_EXTENSIONS_DIR=EXTENSIONS)
        code = f"from tests.distributed.test_adapters_ddp import deepspeed_worker; deepspeed_worker({str(spec)!r})"
        log = tmp_path / f"rank{rank}.log"
        procs.append((subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path, stdout=open(log, "w"),
                                       stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        try:
            rc = proc.wait(timeout=400)
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            rc = "timeout"
        assert rc == 0, f"{log} exit {rc}:\n{log.read_text()[-3000:]}"
    for name in ("lora", "language"):
        probe = torch.load(tmp_path / "out" / f"{name}-probe.pt", map_location="cpu")
        assert probe["global_step"] == 3
        assert (1 - _cosines(probe["end"], probe["start"])).max() > 1e-6, "the adapters did not train"
        model = SentenceTransformer(str(tmp_path / "out" / f"{name}-export"), device="cpu")
        # the probe encodes through the active adapter "default": the Router's route without a task
        cos = _cosines(model.encode(TEXTS, convert_to_tensor=True), probe["end"])
        assert cos.min() >= COSINE, (name, cos.tolist())
