"""DeepSpeed ZeRO-1, 2 and 3 on CPU (gloo, 32-true): fit, end-of-fit export, save, consolidate.

:class:`tests._training.CPUDeepSpeedStrategy` is Lightning's real ``DeepSpeedStrategy`` minus its
CUDA-only check. Ranks are started as a launcher (torchrun, srun) would: one ``python`` process per
rank with ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_*`` set, running this file's ``worker``. The
ranks of one world run every case in turn, which pays the imports once.

ZeRO-3 always runs with ``stage3_param_persistence_threshold: 0``: every parameter is partitioned,
as every weight matrix of a real-size model is (DeepSpeed's default threshold of 1e5 elements keeps
each tensor of the tiny model whole on every rank, and the export then works by accident).

Per case the worker fits a few steps with :class:`~alignment.callbacks.ExportOnFitEnd`, records the
trained model's embeddings of a few sentences through the engine's own forward at the end of
training, and saves the ZeRO checkpoint folder. The test then loads the export as a user does,
``SentenceTransformer(path)``, and requires its embeddings to match the trained model's (cosine >=
0.9999), and that consolidating the ZeRO folder gives the same weights. ZeRO-1, ZeRO-2 and ZeRO-3
with CPU offload are also preempted in-process (a real SIGUSR1 on every rank -> ``last.ckpt`` at step 3
-> ``Preempted``), and a new run resumes to step 5: every step's loss and the final model equal a
straight run's (USR1 and SIGKILL through ``align fit``: ``test_deepspeed_resume.py``, ZeRO-3). A last case
asks for GradCache under DeepSpeed and must be refused at start-up, on every rank, naming both flags.

First run: DeepSpeed compiles its CPU ``shm_comm`` extension (about 110 s on 2 cores), cached in
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``).
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
RESUME_TO = 5
COSINE = 0.9999
TEXTS = ["en_w1 en_w2 en_w3", "de_w4 de_w5", "fr_w7 fr_w8 fr_w9 fr_w10", "es_w2 es_w3 es_w11"]


# ---------------------------------------------------------------------------- rank side


class _Probe:
    """Embeddings of ``TEXTS`` through the engine's model (ZeRO-3 hooks gather each layer) at train start and
    end, plus whether and how the parameters are partitioned; every rank runs the forward, rank 0 saves."""

    def __init__(self, ids, mask, out: Path):
        from lightning.pytorch import Callback

        probe = self
        self.record: dict = {}

        def encode(enc):
            was = enc.training
            enc.eval()
            with torch.no_grad():
                emb = enc.encode(ids, mask)  # (N, D)
            enc.train(was)
            return emb

        class _CB(Callback):
            def on_train_start(self, trainer, pl_module):
                enc = pl_module.encoder
                probe.record.update(
                    start=encode(enc),
                    zero_sized=[n for n, p in enc.named_parameters() if getattr(p, "ds_numel", p.numel()) == 0],
                    shapes={n: list(getattr(p, "ds_shape", p.shape)) for n, p in enc.named_parameters()},
                    # ZeRO-3: each rank's parameter is a shell (numel 0) over its partition of ds_numel values
                    partitioned=all(hasattr(p, "ds_numel") and p.numel() < p.ds_numel for p in enc.parameters()),
                )

            def on_train_end(self, trainer, pl_module):
                probe.record["end"] = encode(pl_module.encoder)
                probe.record["global_step"] = trainer.global_step
                if trainer.is_global_zero:
                    torch.save(probe.record, out)

        self.callback = _CB()


def _trainer(stage: int, world: int, out: Path, max_steps: int, callbacks: list, offload: bool = False):
    from lightning.pytorch import Trainer

    from alignment.callbacks import AtomicModelCheckpoint

    strategy = T.CPUDeepSpeedStrategy(stage=stage, param_persistence_threshold=0 if stage == 3 else None,
                                      parallel_devices=[torch.device("cpu", i) for i in range(world)],
                                      offload_optimizer=offload, offload_parameters=offload)
    return Trainer(accelerator="cpu", devices=world, strategy=strategy, precision="32-true", max_steps=max_steps,
                   logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=any(isinstance(c, AtomicModelCheckpoint) for c in callbacks),
                   num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(out), callbacks=callbacks)


class _Record:
    """``train/loss`` of every step, and the trained model's embeddings of ``TEXTS`` at the end of training."""

    def __init__(self, ids, mask):
        from lightning.pytorch import Callback

        record = self
        self.losses: dict[int, float] = {}
        self.end = None

        class _CB(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                record.losses[trainer.global_step - 1] = float(trainer.callback_metrics["train/loss"])

            def on_train_end(self, trainer, pl_module):
                enc = pl_module.encoder
                enc.eval()
                with torch.no_grad():
                    record.end = enc.encode(ids, mask)
                enc.train()

        self.callback = _CB()


def _resume_case(case: dict, corpus, world: int, out: Path, ids, mask) -> None:
    """In-process, the preemption path: a real SIGUSR1 on every rank after step STEPS - 1 -> ``last.ckpt`` (the
    project's checkpoint callback) at the next step boundary -> ``Preempted``; a new run resumes it to RESUME_TO;
    and a straight run to RESUME_TO. Dropout off (its RNG is not checkpointed). Rank 0 saves the runs' losses
    and final embeddings."""
    from alignment.callbacks import AtomicModelCheckpoint
    from alignment.preemption import Preempted, PreemptionCheckpoint

    stage, data = case["stage"], dict(batch_size=8)
    runs, saved = {}, out / "ckpts" / "last.ckpt"
    for name in ("straight", "preempted", "resumed"):
        module = T.module(corpus, loss=case.get("loss"), seed=0)
        record = _Record(ids, mask)
        callbacks = [T.NoDropout(), record.callback]
        if name == "preempted":
            callbacks += [AtomicModelCheckpoint(dirpath=str(saved.parent), every_n_train_steps=1000),
                          PreemptionCheckpoint(), T.SendSignal(step=STEPS - 1)]
        trainer = _trainer(stage, world, out / name, RESUME_TO, callbacks, offload=case.get("offload", False))
        try:
            trainer.fit(module, datamodule=T.datamodule(corpus, **data),
                        ckpt_path=str(saved) if name == "resumed" else None)
            stopped = None
        except Preempted as exc:
            stopped = exc.step
        runs[name] = {"losses": record.losses, "end": record.end, "global_step": trainer.global_step,
                      "preempted_at": stopped}
        trainer.strategy.barrier("resume-run-done")
        del trainer, module
    if int(os.environ["RANK"]) == 0:
        torch.save(runs, out / "resume.pt")


def worker(spec_path: str) -> None:
    """One rank: every case of the spec in turn (fit + export + ZeRO save, or the GradCache refusal)."""
    from alignment.callbacks import ExportOnFitEnd

    spec = json.loads(Path(spec_path).read_text())
    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    corpus = T.Corpus(Path(spec["shards"]), Path(spec["tokenizer"]), spec["vocab_size"])
    tokenizer = T.datamodule(corpus).tokenizer
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    for case in spec["cases"]:
        out = Path(spec["out"]) / f"{case['name']}-w{world}"
        out.mkdir(parents=True, exist_ok=True)
        encoder = {"name_or_path": spec["hf_folder"]} if case.get("from_hf") else None
        module = T.module(corpus, encoder=encoder, loss=case.get("loss"), gradcache=case.get("gradcache"), seed=0)
        probe = _Probe(enc["input_ids"], enc["attention_mask"], out / "probe.pt")
        trainer = _trainer(case["stage"], world, out, STEPS, [probe.callback, ExportOnFitEnd(dir=str(out / "export"))],
                           offload=case.get("offload", False))
        if case.get("expect_error"):
            try:
                trainer.fit(module, datamodule=T.datamodule(corpus, batch_size=8))
            except ValueError as exc:
                (out / f"error-rank{os.environ['RANK']}.txt").write_text(str(exc))
            continue
        trainer.fit(module, datamodule=T.datamodule(corpus, batch_size=8))
        trainer.save_checkpoint(out / "ckpt")  # collective: a ZeRO folder
        trainer.strategy.barrier("case-done")
        del trainer, module
        if case.get("resume"):
            _resume_case(case, corpus, world, out, enc["input_ids"], enc["attention_mask"])


# ---------------------------------------------------------------------------- test side


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    corpus = T.make_corpus(root / "data", rows=200, rows_per_shard=25)
    hf = root / "hf"
    T.module(corpus, seed=3).encoder.save_pretrained(hf)  # a local HF folder for ZeRO-3's from_pretrained
    return root, corpus, hf


def _run_world(root: Path, corpus, hf: Path, world: int, cases: list[dict], timeout: int = 300):
    spec = root / f"spec-w{world}.json"
    spec.write_text(json.dumps({"shards": str(corpus.shards), "tokenizer": str(corpus.tokenizer),
                                "vocab_size": corpus.vocab_size, "hf_folder": str(hf), "cases": cases,
                                "out": str(root / "out")}))
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


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def _check_case(out: Path, tmp: Path, tokenizer_dir: Path):
    """The end-of-fit export and the consolidated ZeRO folder both hold the trained weights."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from alignment.export import encoder_from_checkpoint, export_checkpoint

    probe = torch.load(out / "probe.pt", map_location="cpu")
    assert probe["global_step"] == STEPS
    trained = probe["end"]  # (N, D): the trained model, through the engine's forward
    assert (1 - _cosines(trained, probe["start"])).max() > 1e-4, "training did not move the weights"

    # What the user consumes: the export at the end of fit, loaded by sentence-transformers.
    exported = SentenceTransformer(str(out / "export"), device="cpu").encode(TEXTS, convert_to_tensor=True)
    cos = _cosines(exported, trained)
    assert cos.min() >= COSINE, f"export vs trained model: cosines {cos.tolist()}"

    # The ZeRO folder consolidated (align export's path) gives the same model.
    assert (out / "ckpt" / "checkpoint").is_dir(), "not the ZeRO folder layout"
    encoder, _, info = encoder_from_checkpoint(out / "ckpt")
    assert info["global_step"] == STEPS
    consolidated = T.encode_texts(encoder, AutoTokenizer.from_pretrained(str(tokenizer_dir)), TEXTS)
    assert _cosines(consolidated, trained).min() >= COSINE
    folder = export_checkpoint(out / "ckpt", tmp / f"export-{out.name}", tokenizer=str(tokenizer_dir))
    again = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert _cosines(again, trained).min() >= COSINE
    return probe


def _check_resume(out: Path) -> None:
    """Preempted (USR1) at STEPS, resumed to RESUME_TO == straight to RESUME_TO: every step's loss, final model."""
    runs = torch.load(out / "resume.pt", map_location="cpu")
    straight, preempted, resumed = runs["straight"], runs["preempted"], runs["resumed"]
    assert preempted["preempted_at"] == STEPS, preempted  # signal after step STEPS - 1, agreed in the next step
    assert straight["preempted_at"] is None and resumed["preempted_at"] is None
    assert straight["global_step"] == resumed["global_step"] == RESUME_TO
    assert sorted(straight["losses"]) == list(range(RESUME_TO))
    assert sorted(preempted["losses"]) == list(range(STEPS))
    assert sorted(resumed["losses"]) == list(range(STEPS, RESUME_TO))
    for step in range(RESUME_TO):
        segment = preempted if step < STEPS else resumed
        assert segment["losses"][step] == pytest.approx(straight["losses"][step], rel=1e-6), (out.name, step)
    torch.testing.assert_close(resumed["end"], straight["end"], rtol=1e-5, atol=1e-6)


def test_zero2_single_rank(setup, tmp_path):
    root, corpus, hf = setup
    _run_world(root, corpus, hf, world=1, cases=[{"name": "zero2", "stage": 2}])  # may include the one-time compile
    _check_case(root / "out" / "zero2-w1", tmp_path, corpus.tokenizer)


def test_zero1_zero2_zero3_two_ranks_export_what_was_trained(setup, tmp_path):
    root, corpus, hf = setup
    cases = [
        {"name": "zero1", "stage": 1, "loss": {"drift_weight": 0.1}, "resume": True},
        {"name": "zero2", "stage": 2, "loss": {"drift_weight": 0.1}, "resume": True},
        # ZeRO-3 from a Hugging Face folder, with the drift reference model on
        {"name": "zero3", "stage": 3, "from_hf": True, "loss": {"drift_weight": 0.1}},
        # ZeRO-3 with optimiser states and parameters offloaded to CPU memory (configs/deepspeed/zero3-offload.yaml)
        {"name": "zero3-offload", "stage": 3, "offload": True, "loss": {"drift_weight": 0.1}, "resume": True},
        {"name": "zero2-gradcache", "stage": 2, "gradcache": {"chunk_size": 4}, "expect_error": True},
    ]
    _run_world(root, corpus, hf, world=2, cases=cases)
    for stage in (1, 2):
        _check_case(root / "out" / f"zero{stage}-w2", tmp_path, corpus.tokenizer)
        _check_resume(root / "out" / f"zero{stage}-w2")
    probe = _check_case(root / "out" / "zero3-w2", tmp_path, corpus.tokenizer)
    assert _check_case(root / "out" / "zero3-offload-w2", tmp_path, corpus.tokenizer)["partitioned"]
    _check_resume(root / "out" / "zero3-offload-w2")

    # ZeRO-3 loaded the HF folder's weights into its partitions: full shapes, none empty, every parameter
    # partitioned, and the first forward through the partitioned model equals the plain model's.
    from transformers import AutoTokenizer

    from alignment.model import DualEncoder

    plain = DualEncoder.from_pretrained(hf)
    assert probe["partitioned"], "ZeRO-3 did not partition every parameter"
    assert probe["zero_sized"] == []
    assert torch.load(root / "out" / "zero2-w2" / "probe.pt", map_location="cpu")["partitioned"] is False
    assert probe["shapes"] == {n: list(p.shape) for n, p in plain.named_parameters()}
    tok = AutoTokenizer.from_pretrained(str(corpus.tokenizer))
    torch.testing.assert_close(probe["start"], T.encode_texts(plain, tok, TEXTS), atol=1e-5, rtol=0)

    # GradCache under DeepSpeed: refused at start-up on every rank, naming both flags, nothing exported.
    refused = root / "out" / "zero2-gradcache-w2"
    for rank in range(2):
        message = (refused / f"error-rank{rank}.txt").read_text()
        assert "--model.gradcache.chunk_size 4" in message and "--trainer.strategy" in message, message
        assert "DeepSpeed" in message, message
    assert not (refused / "export").exists() and not (refused / "probe.pt").exists()
