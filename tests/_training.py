"""Fixtures shared by the training-application tests: a synthetic corpus, tiny modules, short fits.

Everything is built in the caller's ``tmp_path`` from ``alignment.synthetic``;
nothing comes from the hub.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import Callback

LANGUAGES = ("en", "de", "fr", "es")
REPO = Path(__file__).resolve().parents[1]
DEBUG_YAML = REPO / "configs" / "debug.yaml"


@dataclass
class Corpus:
    shards: Path
    """Folder holding the shards and their manifest (``--data.train_shards``)."""
    tokenizer: Path
    """Saved tiny tokenizer (``--data.tokenizer``)."""
    vocab_size: int
    """Rows the tiny encoder's embedding table needs (``--model.encoder.vocab_size``)."""


def make_corpus(root: Path, rows: int = 240, rows_per_shard: int = 30, seed: int = 0) -> Corpus:
    """Write synthetic multi-way rows as shards with ``align shards build``, plus the tiny tokenizer."""
    from alignment.cli import main
    from alignment.synthetic import synthetic_rows, tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    jsonl = root / "rows.jsonl"
    with open(jsonl, "w") as fh:
        for r in synthetic_rows(rows, LANGUAGES, seed=seed, missing_prob=0.2):
            fh.write(json.dumps({"id": r.id, "texts": r.texts}) + "\n")
    shards = root / "shards"
    rc = main(["shards", "build", "--format", "jsonl", str(jsonl), "--out", str(shards),
               "--rows_per_shard", str(rows_per_shard)])
    assert rc == 0, "align shards build failed"
    tok = tiny_tokenizer(save_dir=root / "tok")
    return Corpus(shards, root / "tok", len(tok))


def datamodule(corpus: Corpus, **data):
    """An ``AlignmentDataModule`` over the corpus, in-process reading, small batches."""
    from alignment.data.datamodule import AlignmentDataModule, DataConfig

    cfg = dict(train_shards=str(corpus.shards), tokenizer=str(corpus.tokenizer), batch_size=16, num_workers=0,
               max_length=32, shuffle_buffer=64, seed=0)
    cfg.update(data)
    return AlignmentDataModule(DataConfig(**cfg))


def module(corpus: Corpus, *, encoder: dict | None = None, loss: dict | None = None, optim: dict | None = None,
           gradcache: dict | None = None, step: dict | None = None, seed: int = 0):
    """A tiny ``AlignmentModule`` (random 2-layer BERT), seeded so two calls build identical weights."""
    from alignment.gradcache import GradCacheConfig
    from alignment.losses import LossConfig
    from alignment.model import ModelConfig
    from alignment.module import AlignmentModule, StepConfig
    from alignment.optim import OptimConfig

    torch.manual_seed(seed)
    return AlignmentModule(
        ModelConfig(**{"name_or_path": "tiny", "vocab_size": corpus.vocab_size, **(encoder or {})}),
        LossConfig(**(loss or {})),
        OptimConfig(**{"lr": 1e-3, "warmup_steps": 1, **(optim or {})}),
        GradCacheConfig(**(gradcache or {})),
        StepConfig(**(step or {})),
    )


def trainer(root: Path, max_steps: int = 3, **kwargs):
    """A real CPU ``Trainer`` with no progress bar, no validation and (unless given) no loggers/checkpoints."""
    from lightning.pytorch import Trainer

    defaults = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    limit_val_batches=0, default_root_dir=str(root))
    defaults.update(kwargs)
    return Trainer(**defaults)


def grads(module) -> dict[str, torch.Tensor]:
    """A copy of every parameter gradient of ``module`` (parameters without one left out)."""
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_same_grads(got: dict, expected: dict, tol: float = 1e-10) -> None:
    """Same parameter names, each gradient equal within ``tol`` relative and ``tol`` x the largest entry absolute."""
    assert got.keys() == expected.keys() and expected
    scale = max(float(g.abs().max()) for g in expected.values())
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=tol, atol=tol * scale, msg=lambda m, n=name: f"{n}: {m}")


def encode_texts(encoder, tokenizer, texts: list[str], max_length: int = 128) -> torch.Tensor:
    """The training model's embeddings of ``texts``: ``(len(texts), D)``, as the training step computes them."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        out = encoder.encode(enc["input_ids"], enc["attention_mask"])  # (N, D)
    encoder.train(was_training)
    return out


# ---------------------------------------------------------------------------- reading logged metrics back

_WANDB_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """The ``wandb_internal_pb2.Record`` messages of an offline run's ``run-<id>.wandb`` file.

    Format (wandb's datastore, a LevelDB-style log): a 7-byte header ``:W&B``
    + magic + version, then 32 KiB blocks of chunks, each ``crc32 (4) |
    length (2, little endian) | type (1) | payload``; a record spans chunks
    FIRST, MIDDLE..., LAST; a block tail shorter than a chunk header is padding.
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a wandb datastore file (header {data[:7]!r})")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = _WANDB_BLOCK - pos % _WANDB_BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the block end
            pos += left
            continue
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield pb.Record.FromString(payload)
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            yield pb.Record.FromString(pending + payload)
            pending = b""


def wandb_history(run_root: Path) -> tuple[str, list[dict]]:
    """``(run id, history rows)`` of the one offline run under ``run_root/wandb``; values JSON-decoded."""
    files = wandb_files(run_root)
    _wait_for_exit_record(files[-1])
    rows, run_id = [], None
    for f in files:
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run_id = rec.run.run_id
            elif kind == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return run_id, rows


def wandb_files(run_root: Path, pattern: str = "wandb/offline-run-*/run-*.wandb", timeout: float = 60.0) -> list[Path]:
    """The offline wandb run files under ``run_root``, waiting up to ``timeout`` s for the first to appear.

    wandb's service process writes them; under load it can still be creating them when the training
    process has already exited.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        files = sorted(Path(run_root).glob(pattern))
        if files:
            return files
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"no offline wandb run under {run_root}/wandb ({pattern})")
        time.sleep(0.2)


def _wait_for_exit_record(path: Path, timeout: float = 60.0) -> None:
    """Wait until wandb's writer has closed ``path`` with its ``exit`` record.

    ``run.finish()`` returns once wandb's service has the records, not once its
    writer has flushed them: read at once, the file is sometimes still being
    written (seen here under load: no ``run`` record yet).
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            if any(rec.WhichOneof("record_type") == "exit" for rec in wandb_records(path)):
                return
        except Exception:  # a chunk still being written
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: wandb never wrote its exit record within {timeout:.0f} s")
        time.sleep(0.2)


def csv_metrics(path: Path) -> list[dict]:
    """Rows of a CSVLogger ``metrics.csv`` with empty cells dropped and numbers parsed."""
    import csv

    with open(path) as fh:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]


# ---------------------------------------------------------------------------- `align fit` in subprocesses


class SlowDown(Callback):
    """Test-only callback (``--trainer.callbacks+=tests._training.SlowDown``): sleep after each step.

    Makes "kill after the first checkpoint, before the end" deterministic for a
    model whose steps take milliseconds.
    """

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


class NoDropout(Callback):
    """Test-only callback: dropout probability 0 everywhere, so a resumed run can match an uninterrupted one
    exactly (Lightning does not checkpoint the RNG state that draws dropout masks)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        for module in pl_module.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        backbone = getattr(getattr(pl_module, "encoder", None), "backbone", None)
        if backbone is not None and hasattr(backbone.config, "attention_probs_dropout_prob"):
            backbone.config.attention_probs_dropout_prob = 0.0


class SendSignal(Callback):
    """Test-only callback: send ``signum`` (default SIGUSR1) to this process after optimiser step ``step``.

    A real signal through the real handler, at a known step (``alignment.preemption`` tests).
    """

    def __init__(self, step: int, signum: int = 10) -> None:
        self.step = step
        self.signum = signum
        self.sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import os

        if not self.sent and trainer.global_step == self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def align_env(**extra: str) -> dict[str, str]:
    """Environment for an ``align`` subprocess: offline, one thread per rank, this repo importable."""
    import os

    env = dict(os.environ)
    # An in-process wandb run (an earlier test) leaves WANDB_SERVICE, the address of this
    # process's wandb service, in os.environ; a child that inherits it logs through that
    # service instead of its own, and its run files may never be written.
    env.pop("WANDB_SERVICE", None)
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(extra)
    return env


# ---------------------------------------------------------------------------- DeepSpeed on CPU (gloo)


from lightning.pytorch.strategies import DeepSpeedStrategy  # noqa: E402 - deepspeed itself is imported lazily


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Test-only (``--trainer.strategy tests._training.CPUDeepSpeedStrategy``): Lightning's real
    ``DeepSpeedStrategy`` on CPU ranks over gloo.

    Lightning refuses any accelerator but CUDA; this skips that one check and otherwise runs the real
    strategy: ``deepspeed.initialize``, ZeRO partitioning, the ZeRO checkpoint layout. Needs
    ``DS_ACCELERATOR=cpu``. ``param_persistence_threshold=0`` forces ZeRO-3 to partition every parameter,
    as it does every weight matrix of a real-size model (DeepSpeed's default, 1e5 elements, keeps each
    tensor of the tiny model whole on every rank, which hides gathering bugs).
    """

    def __init__(self, stage: int = 2, param_persistence_threshold: int | None = None,
                 process_group_backend: str = "gloo", logging_level: int = 40, **kwargs) -> None:
        super().__init__(stage=stage, process_group_backend=process_group_backend, logging_level=logging_level,
                         **kwargs)
        if param_persistence_threshold is not None:
            self.config["zero_optimization"]["stage3_param_persistence_threshold"] = param_persistence_threshold

    def setup_environment(self) -> None:
        from lightning.pytorch.strategies import DDPStrategy

        # Indexed CPU devices: Lightning checks device index == local rank, and DeepSpeed takes the
        # index as its device rank; torch treats cpu:i as the one CPU.
        self.parallel_devices = [torch.device("cpu", i) for i in range(len(self.parallel_devices or [None]))]
        DDPStrategy.setup_environment(self)


class EmbedAtTrainEnd(Callback):
    """Test-only callback: at the end of training, the trained model's embeddings of ``texts`` (the run's
    tokenizer, the engine's own forward: ZeRO-3 gathers each layer), saved by rank 0 to ``out``.

    Every rank runs the forward (under ZeRO-3 it is a collective). What an export must reproduce.
    """

    def __init__(self, out: str, texts: list[str]) -> None:
        self.out = out
        self.texts = list(texts)

    def on_train_end(self, trainer, pl_module) -> None:
        tokenizer = trainer.datamodule.tokenizer
        enc = tokenizer(self.texts, padding=True, return_tensors="pt").to(pl_module.device)
        encoder = pl_module.encoder
        was = encoder.training
        encoder.eval()
        with torch.no_grad():
            emb = encoder.encode(enc["input_ids"], enc["attention_mask"])  # (N, D)
        encoder.train(was)
        if trainer.is_global_zero:
            torch.save({"emb": emb.float().cpu(), "dtype": str(next(encoder.parameters()).dtype),
                        "global_step": trainer.global_step}, self.out)


# an `align fit` config overlay: the CSV logger only (no wandb), for runs whose metrics.csv a test reads
CSV_ONLY = """\
trainer:
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {save_dir: runs/debug, name: csv}
"""
