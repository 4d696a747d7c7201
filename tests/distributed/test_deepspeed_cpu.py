"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU (gloo, 32-true): fit, save, consolidate, export.

Lightning's ``DeepSpeedStrategy`` refuses any accelerator but CUDA;
:class:`CPUDeepSpeedStrategy` (test-only) skips that one check and otherwise
runs the real strategy: ``deepspeed.initialize``, ZeRO partitioning, the ZeRO
checkpoint layout. Ranks are started as a launcher (torchrun, srun) would:
one ``python`` process per rank with ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/
``MASTER_*`` set, running this file's ``worker``. The ranks of one world fit
each stage in turn (ZeRO-2, then ZeRO-3), which pays the imports once.

Per stage the worker saves the ZeRO checkpoint folder and, from rank 0, the
trained encoder weights (gathered under ZeRO-3); the test then consolidates the
folder with ``encoder_from_checkpoint`` and exports it, and both must equal the
trained weights. ZeRO-3 starts from a Hugging Face folder (``from_pretrained``):
its partitioned parameters must hold the loaded weights, not size-0 shells.

First run: DeepSpeed compiles its CPU ``shm_comm`` extension (about 95 s),
cached in ``TORCH_EXTENSIONS_DIR`` (default here ``~/.cache/torch_extensions``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import _training as T
from tests.distributed._spawn import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
STEPS = 3


# ---------------------------------------------------------------------------- rank side


def _cpu_deepspeed_strategy(stage: int, world: int):
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        """``DeepSpeedStrategy`` without its CUDA-only accelerator check (tests on CPU)."""

        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)

    # Indexed CPU devices: Lightning checks device index == local rank, and DeepSpeed takes the
    # index as its device rank; torch treats cpu:i as the one CPU.
    return CPUDeepSpeedStrategy(stage=stage, parallel_devices=[torch.device("cpu", i) for i in range(world)],
                                process_group_backend="gloo", logging_level=40, logging_batch_size_per_gpu=1)


def _full_state(encoder, stage: int) -> dict[str, torch.Tensor]:
    """The encoder's full weights on every rank (collective under ZeRO-3)."""
    params = list(encoder.parameters())
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


class _LoadProbe:
    """At train start (after ``deepspeed.initialize``): shapes and first-forward embeddings of the engine's model."""

    def __init__(self, ids, mask, out):
        from lightning.pytorch import Callback

        probe = self

        class _CB(Callback):
            def on_train_start(self, trainer, pl_module):
                enc = pl_module.encoder
                zero_sized = [n for n, p in enc.named_parameters() if getattr(p, "ds_numel", p.numel()) == 0]
                shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in enc.named_parameters()}
                # ZeRO-3: each rank's parameter is a shell (numel 0) over its partition of ds_numel values
                partitioned = all(hasattr(p, "ds_numel") and p.numel() < p.ds_numel for p in enc.parameters())
                enc.eval()
                with torch.no_grad():
                    emb = enc.encode(ids, mask)  # (N, D); ZeRO-3 hooks gather each layer's weights
                enc.train()
                if trainer.is_global_zero:
                    torch.save({"emb": emb, "shapes": shapes, "zero_sized": zero_sized, "partitioned": partitioned},
                               out)

        self.callback = _CB()


def worker(spec_path: str) -> None:
    """One rank: for each stage in the spec, fit STEPS steps, save a ZeRO checkpoint, dump the trained weights."""
    from lightning.pytorch import Trainer

    spec = json.loads(Path(spec_path).read_text())
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    torch.set_num_threads(1)
    corpus = T.Corpus(Path(spec["shards"]), Path(spec["tokenizer"]), spec["vocab_size"])
    tokenizer = T.datamodule(corpus).tokenizer
    enc = tokenizer(spec["texts"], padding=True, return_tensors="pt")
    for stage in spec["stages"]:
        out = Path(spec["out"]) / f"zero{stage}-w{world}"
        encoder = {"name_or_path": spec["hf_folder"]} if stage == 3 else None
        module = T.module(corpus, encoder=encoder, seed=0)
        probe = _LoadProbe(enc["input_ids"], enc["attention_mask"], out / "probe.pt")
        trainer = Trainer(accelerator="cpu", devices=world, strategy=_cpu_deepspeed_strategy(stage, world),
                          precision="32-true", max_steps=STEPS, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                          limit_val_batches=0, default_root_dir=str(out), callbacks=[probe.callback])
        out.mkdir(parents=True, exist_ok=True)
        trainer.fit(module, datamodule=T.datamodule(corpus, batch_size=8))
        trainer.save_checkpoint(out / "ckpt")  # collective: a ZeRO folder
        state = _full_state(module.encoder, stage)
        if rank == 0:
            torch.save({"state": state, "global_step": trainer.global_step}, out / "trained.pt")
        trainer.strategy.barrier("stage-done")
        del trainer, module


# ---------------------------------------------------------------------------- test side


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    corpus = T.make_corpus(root / "data", rows=200, rows_per_shard=25)
    hf = root / "hf"
    T.module(corpus, seed=3).encoder.save_pretrained(hf)  # a local HF folder for ZeRO-3's from_pretrained
    texts = ["en_w1 en_w2 en_w3", "de_w4 de_w5", "fr_w7 fr_w8 fr_w9 fr_w10"]
    return root, corpus, hf, texts


def _run_world(root: Path, corpus, hf: Path, texts, world: int, stages: list[int], timeout: int = 170):
    spec = root / f"spec-w{world}.json"
    spec.write_text(json.dumps({"shards": str(corpus.shards), "tokenizer": str(corpus.tokenizer),
                                "vocab_size": corpus.vocab_size, "hf_folder": str(hf), "texts": texts,
                                "stages": stages, "out": str(root / "out")}))
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = T.align_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                          NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, DS_ACCELERATOR="cpu",
                          TORCH_EXTENSIONS_DIR=EXTENSIONS)
        code = f"from tests.distributed.test_deepspeed_cpu import worker; worker({str(spec)!r})"
        log = open(root / f"rank{rank}-w{world}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-c", code], env=env, cwd=root, stdout=log,
                                       stderr=subprocess.STDOUT), log.name))
    failures = []
    for proc, log in procs:
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            rc = "timeout"
        if rc != 0:
            failures.append(f"{log} exit {rc}:\n{Path(log).read_text()[-3000:]}")
    assert not failures, "\n".join(failures)


def _check_export(out: Path, tmp: Path, texts, tokenizer_dir: Path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from alignment.export import encoder_from_checkpoint, export_checkpoint

    trained = torch.load(out / "trained.pt", map_location="cpu")
    assert trained["global_step"] == STEPS
    assert (out / "ckpt" / "checkpoint").is_dir(), "not the ZeRO folder layout"
    encoder, _, info = encoder_from_checkpoint(out / "ckpt")
    assert info["global_step"] == STEPS
    state = encoder.state_dict()
    assert state.keys() == trained["state"].keys()
    for name, value in trained["state"].items():
        torch.testing.assert_close(state[name], value, atol=0, rtol=0, msg=name)
    folder = export_checkpoint(out / "ckpt", tmp / f"export-{out.name}", tokenizer=str(tokenizer_dir))
    got = SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)
    expected = T.encode_texts(encoder, AutoTokenizer.from_pretrained(str(tokenizer_dir)), texts)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    return encoder


def test_zero2_single_rank(setup, tmp_path):
    root, corpus, hf, texts = setup
    _run_world(root, corpus, hf, texts, world=1, stages=[2], timeout=300)  # may include the one-time compile
    _check_export(root / "out" / "zero2-w1", tmp_path, texts, corpus.tokenizer)


def test_zero2_and_zero3_two_ranks(setup, tmp_path):
    root, corpus, hf, texts = setup
    _run_world(root, corpus, hf, texts, world=2, stages=[2, 3], timeout=300)
    _check_export(root / "out" / "zero2-w2", tmp_path, texts, corpus.tokenizer)
    trained3 = _check_export(root / "out" / "zero3-w2", tmp_path, texts, corpus.tokenizer)

    # ZeRO-3 loaded the HF folder's weights into its partitions: full shapes, none empty,
    # and the first forward through the partitioned model equals the plain model's.
    from alignment.model import DualEncoder
    from transformers import AutoTokenizer

    probe = torch.load(root / "out" / "zero3-w2" / "probe.pt", map_location="cpu")
    plain = DualEncoder.from_pretrained(hf)
    assert probe["partitioned"], "ZeRO-3 did not partition the parameters"
    assert probe["zero_sized"] == []
    assert torch.load(root / "out" / "zero2-w2" / "probe.pt", map_location="cpu")["partitioned"] is False
    assert probe["shapes"] == {n: list(p.shape) for n, p in plain.named_parameters()}
    tok = AutoTokenizer.from_pretrained(str(corpus.tokenizer))
    torch.testing.assert_close(probe["emb"], T.encode_texts(plain, tok, texts), atol=1e-5, rtol=0)
    # and training moved the weights away from the loaded ones
    assert any(not torch.equal(trained3.state_dict()[n], p) for n, p in plain.state_dict().items())
