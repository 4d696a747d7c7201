"""Training-step throughput of the framework, against sentence-transformers and a hand-written loop.

Three arms train the same encoder (same starting weights), on the same batches
of (English, German) pairs in the same order, with the same loss, optimiser,
max_length, precision and thread count, back to back in one process:

- **framework**: ``Trainer.fit`` over ``AlignmentModule`` and the real
  ``AlignmentDataModule`` (WebDataset shards written to a temp dir, streamed,
  tokenised, collated into a ``Batch``), with the ``ThroughputLogger`` callback
  that ``align fit`` installs; no checkpoints, no logger, no validation.
- **hand**: plain PyTorch + ``AutoModel``: one forward over the pre-tokenised
  batch tensors (the framework's own batches, moved to the device before
  timing), mean pooling, L2 normalisation, cross-entropy, backward, AdamW step.
  No data loading at all: the framework-overhead floor.
- **sentence-transformers**: ``SentenceTransformerTrainer`` with
  ``MultipleNegativesRankingLoss`` on a ``datasets.Dataset`` of (anchor,
  positive) texts, batched in the framework's order (ST's own
  ``DefaultBatchSampler`` over a sequential sampler); it tokenises in its
  collator and encodes the anchor and the positive column in two forwards
  (``embed_columns(separate_first=True)``, its default), as in real use.

The loss, identical in all three: one-directional InfoNCE with in-batch
negatives, anchor = English sentence, candidates = the German sentences of the
batch, positive = its translation, scale 20 (temperature 0.05), mean over
anchors. In the framework that is ``--model.loss.objective en_x
--model.loss.bidirectional false`` with ``--data.language_policy
pivot_pair`` on en-de rows; in sentence-transformers it is
``MultipleNegativesRankingLoss(scale=20)`` (``directions=("query_to_doc",)``,
cosine similarity). Before timing, the three losses are evaluated on the first
batch from the same weights in eval mode (fp32) and reported: they must agree.
AdamW with the same lr, no weight decay, constant schedule, no gradient
clipping (HF ``max_grad_norm=0``; both trainers still compute the gradient norm,
as they do by default).

Timing: wall time between the ends of consecutive optimiser steps (a Lightning
callback, a ``transformers`` ``TrainerCallback``, the loop itself), so each
step includes its data loading; the first ``--warmup-steps`` steps are skipped.
On CUDA every timestamp is taken after ``torch.cuda.synchronize()``. The arms
alternate over ``--rounds`` rounds (the order rotates each round); medians and
per-round ratios are reported, with the spread over rounds as the noise.

Model FLOPs (PaLM, Chowdhery et al. 2022, appendix B), forward + backward, per
token of a batch padded to width T::

    flops/token = 6 * N + 12 * L * H * T

with N the parameters of the L transformer layers (embeddings excluded: a
lookup, not a matmul), H the hidden width. Counted over every token the
encoder processes (padding included; ``--min-words`` large enough makes every
sentence exactly ``--max-length`` tokens, no padding). MFU = achieved model
FLOP/s / peak; the peak is the bf16 dense tensor-core figure of the GPU
(:data:`PEAK_BF16_TFLOPS`) or ``--peak-tflops``.

    python benchmarks/train_throughput.py --threads 1                      # tiny random model, synthetic rows
    python benchmarks/train_throughput.py --model demo_out/e5 --corpus gettext --batch-size 32 --max-length 64 \
        --warmup-steps 2 --steps 6 --rounds 5 --threads 1                  # the demo's encoder (`make demo` builds it)
    python benchmarks/train_throughput.py --model-config xlm-roberta-base --max-length 128 \\
        --min-words 150 --max-words 160 --batch-size 64                  # on a GPU: bf16, MFU

On a CPU shared with other jobs, ``--threads 1``: on the 2-core project machine
(load average about 4) two torch threads made every arm's step about 2.5 times
slower than one thread (the threads wait on each other whenever one is
descheduled), and inflated CPU time the same way, so neither clock meant much.

Results: ``benchmarks/results/train_throughput-<date>-<model>-<machine>.{md,json}``
with the machine, versions, the exact command and the date.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/train_throughput.py` from a checkout
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # benchmarks/_common.py, also when loaded by path
from _common import (  # noqa: E402
    RESULTS,
    command_line,
    machine_info,
    machine_lines,
    machine_tag,
    markdown_table,
    now,
    result_stem,
)
from _common import write_results as write_report  # noqa: E402

PACKAGES = ("lightning", "transformers", "sentence_transformers", "datasets", "accelerate")

ARMS = ("framework", "hand", "sentence-transformers")
"""The default arms."""
PACKED = "framework-packed"
"""The framework with unpadded steps (``--model.step.unpadded on``, ``attn_implementation sdpa_varlen``: PyTorch's
varlen kernel on CUDA, its exact quadratic reference elsewhere); opt-in with ``--arms``."""
ALL_ARMS = ARMS + (PACKED,)
FRAMEWORKS = ("framework", PACKED)
PIVOT, OTHER = "en", "de"
LANGUAGES = (OTHER, PIVOT)  # sorted: the Batch vocabulary, language ids 0 = de, 1 = en

PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM; device names read "NVIDIA H100 80GB HBM3"
    ("A100", 312.0),
)
"""Dense bf16 tensor-core peak (TFLOP/s) by a substring of ``torch.cuda.get_device_name``; first match wins."""


# --------------------------------------------------------------------------- models


def _tiny_config(vocab_size: int, pad_id: int, max_length: int):
    from alignment.model import DualEncoder

    return DualEncoder.tiny_config(vocab_size, pad_token_id=pad_id, max_position_embeddings=max(128, max_length))


def _xlmr_config(size: str):
    """xlm-roberta-{base,large} as in their hub ``config.json`` (transformers' own defaults are BERT-sized)."""
    dims = {
        "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
        "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    }[size]

    def build(vocab_size: int, pad_id: int, max_length: int):
        from transformers import XLMRobertaConfig

        # Positions start at pad_id + 1 (RoBERTa): 514 positions hold 512 tokens after pad id 1.
        return XLMRobertaConfig(vocab_size=max(250002, vocab_size), max_position_embeddings=514, type_vocab_size=1,
                                layer_norm_eps=1e-5, pad_token_id=pad_id, **dims)

    return build


MODEL_CONFIGS = {
    "tiny": _tiny_config,
    "xlm-roberta-base": _xlmr_config("base"),
    "xlm-roberta-large": _xlmr_config("large"),
}
"""``--model-config`` names: architectures built with random weights (no hub download)."""


def build_random_model(name: str, tokenizer_path: str | None, max_length: int, folder: Path, seed: int,
                       attention_dropout: float | None = None) -> str:
    """Save ``name``'s architecture with random weights, plus a tokenizer, to ``folder`` (every arm loads it);
    ``attention_dropout`` overrides the config's (``--model.encoder.attention_dropout``'s setter)."""
    from transformers import AutoModel, AutoTokenizer

    from alignment.model import with_attention_dropout
    from alignment.synthetic import tiny_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path) if tokenizer_path else tiny_tokenizer()
    config = with_attention_dropout(MODEL_CONFIGS[name](len(tokenizer), tokenizer.pad_token_id, max_length),
                                    attention_dropout)
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


@dataclass
class FlopModel:
    """Model FLOPs of a forward + backward pass (see the module docstring)."""

    layers: int
    hidden: int
    layer_params: int
    """N: parameters of the transformer layers (embeddings and the unused pooler excluded)."""
    total_params: int

    @classmethod
    def of(cls, folder: str, max_length: int) -> "FlopModel":
        from transformers import AutoConfig, AutoModel

        from alignment.model import transformer_layers

        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):  # shapes only, no memory
            model = AutoModel.from_config(config)
        layers = transformer_layers(model)
        limit = getattr(config, "max_position_embeddings", None)
        offset = config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta") else 0
        if limit is not None and max_length + offset > limit:
            raise SystemExit(f"--max-length {max_length} exceeds the model's {limit - offset} positions ({folder})")
        return cls(len(layers), config.hidden_size, sum(p.numel() for p in layers.parameters()),
                   sum(p.numel() for p in model.parameters()))

    def batch_flops(self, sentences: int, width: int) -> float:
        """FLOPs of one training step on ``sentences`` sequences padded to ``width`` tokens."""
        tokens = sentences * width
        return tokens * (6 * self.layer_params + 12 * self.layers * self.hidden * width)


# --------------------------------------------------------------------------- data


def cleaning_config():
    """The shard builder's cleaning, without its 1,000-character cap: long rows fill ``--max-length`` for MFU runs."""
    from alignment.data.cleaning import CleaningConfig

    return CleaningConfig(pivot=PIVOT, languages=(PIVOT, OTHER), max_chars=1_000_000)


def corpus_rows(corpus: str, n: int, min_words: int, max_words: int, seed: int) -> list:
    """``n`` clean, distinct en-de rows (synthetic, or gettext catalogs of the Django and Wagtail wheels)."""
    from alignment.data.cleaning import clean_rows
    from alignment.data.readers.gettext import read_gettext
    from alignment.synthetic import synthetic_rows

    if corpus == "synthetic":
        source = synthetic_rows(2 * n + 64, (PIVOT, OTHER), seed=seed, min_words=min_words, max_words=max_words)
    else:
        source = read_gettext(packages=("django", "wagtail"), languages=(PIVOT, OTHER))
    cleaned = clean_rows(source, cleaning_config())
    rows = [r for r in cleaned if len(r.texts[PIVOT].split()) >= min_words][:n]
    if len(rows) < n:
        raise SystemExit(
            f"--corpus {corpus} gives {len(rows)} usable en-de rows with --min-words {min_words}, but "
            f"--batch-size x (--warmup-steps + --steps) = {n} are needed: lower one of them"
        )
    return rows


def write_shards(rows: list, folder: Path, batch_size: int, seed: int) -> Path:
    """The rows as WebDataset shards of exactly one batch each (``align shards``' writer, all in train)."""
    from alignment.data.build import build_shards
    from alignment.data.shards_write import ShardBuildConfig

    manifest = build_shards(rows, ShardBuildConfig(out=folder, rows_per_shard=batch_size, split="1,0,0", seed=seed,
                                                     cleaning=cleaning_config()))
    kept = manifest["splits"]["train"]["rows"]
    if kept != len(rows):
        raise RuntimeError(f"the shard build kept {kept} of {len(rows)} pre-cleaned rows")
    return folder


def pretokenize(shards: Path, tokenizer, max_length: int) -> None:
    """``align shards tokenize``'s sidecars for ``shards``: the framework's loader then reads token ids, as the
    hand loop's pre-tokenised tensors do (``--pretokenized``)."""
    from alignment.data.tokens import tokenize_build

    tokenize_build(shards, tokenizer, max_length=max_length, text_prefix="", log=lambda *a, **k: None)


def data_config(args: argparse.Namespace, shards: Path, tokenizer_dir: str, workers: int):
    from alignment.data.datamodule import DataConfig

    return DataConfig(train_shards=str(shards), tokenizer=tokenizer_dir, batch_size=args.batch_size,
                      language_policy="pivot_pair", languages=list(LANGUAGES), pivot=PIVOT,
                      max_length=args.max_length, num_workers=workers, seed=args.seed)


def stream_batches(config, tokenizer, count: int) -> list:
    """The first ``count`` batches the framework's training stream yields (epoch 0), in order."""
    from alignment.data.datamodule import AlignmentDataModule

    dm = AlignmentDataModule(config, tokenizer=tokenizer)
    dm.setup("fit")
    batches = []
    for batch in dm.train_dataloader():
        batches.append(batch)
        if len(batches) == count:
            break
    for i, b in enumerate(batches):
        if b.num_rows != config.batch_size or b.num_sentences != 2 * config.batch_size or b.languages != LANGUAGES:
            raise RuntimeError(f"stream batch {i}: {b.num_rows} rows, {b.num_sentences} sentences, {b.languages}")
    return batches


def forward_shapes(arm: str, batch) -> list[tuple[int, int]]:
    """``(sequences, padded width)`` of each encoder forward an arm runs on ``batch``.

    The hand loop encodes all ``2B`` sentences in one forward padded to the
    longest; the framework runs the length-grouped forwards of
    ``alignment.encode`` under the default ``--model.step.token_budget``
    (counted with a recording stand-in for the model); sentence-transformers (``embed_columns`` with its
    default ``separate_first=True``) runs the anchor column and the positive
    column as two forwards, each padded to its own longest (its tokenisation
    gives the same token counts: same tokenizer, same truncation).
    """
    if arm == PACKED:  # one sequence of every real token; attention within each sentence
        lengths = batch.attention_mask.sum(dim=1).tolist()
        return [(1, int(n)) for n in lengths]
    if arm == "framework":
        from alignment.encode import encode_grouped
        from alignment.module import StepConfig

        shapes: list[tuple[int, int]] = []
        record = lambda b: shapes.append(tuple(b.input_ids.shape)) or torch.zeros(b.num_sentences, 1)  # noqa: E731
        encode_grouped(record, batch, StepConfig().token_budget)
        return shapes
    if arm != "sentence-transformers":
        return [tuple(batch.input_ids.shape)]
    lengths = batch.attention_mask.sum(dim=1)  # (2B,)
    anchors, positives = pair_indices(batch)
    return [(len(anchors), int(lengths[anchors].max())), (len(positives), int(lengths[positives].max()))]


def pair_indices(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sentence indices of the anchors (en) and positives (de) of a batch, both in row order."""
    pivot = batch.lang_ids == batch.pivot_lang_id
    anchors, positives = torch.nonzero(pivot).flatten(), torch.nonzero(~pivot).flatten()  # (B,), (B,)
    rows = torch.arange(batch.num_rows)
    if not (torch.equal(batch.row_ids[anchors], rows) and torch.equal(batch.row_ids[positives], rows)):
        raise RuntimeError("a batch is not one en and one de sentence per row in row order")
    return anchors, positives


# --------------------------------------------------------------------------- the shared context


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    bf16: bool
    model_dir: str
    tokenizer: Any
    data: Any
    """The framework's ``DataConfig``."""
    batches: list
    """The framework stream's first ``warmup + steps`` batches: what every arm trains on, in order."""
    texts: dict[str, dict[str, str]]
    """Row id -> {language: text}."""
    work: Path

    @property
    def total_steps(self) -> int:
        return self.args.warmup_steps + self.args.steps

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # CPU-GPU sync point: the timestamp must follow the step's kernels

    def stamp(self, index: int | None = None) -> tuple[float, float]:
        """``(wall, CPU)`` seconds at the end of step ``index``. CPU time is this process's, all its threads: on a
        shared machine it barely moves when other jobs take the cores, where wall time does. At the two steps
        the measurement spans (the last warm-up step and the last step) it also counts the CPU time of this
        process's children (DataLoader workers), which the step waits for no less than for itself."""
        self.sync()
        wall, cpu = time.perf_counter(), time.process_time()
        if index in (self.args.warmup_steps - 1, self.total_steps - 1):
            cpu += children_cpu()
        return wall, cpu

    def pairs(self) -> tuple[list[str], list[str]]:
        """(anchors, positives) texts in the order of the framework's batches."""
        keys = [key for b in self.batches for key in b.row_keys]
        return [self.texts[k][PIVOT] for k in keys], [self.texts[k][OTHER] for k in keys]


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's live child processes (the DataLoader workers)."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:  # exited between the listing and the read
            continue
        total += times.user + times.system
    return total


# --------------------------------------------------------------------------- arm: framework


def framework_module(ctx: Context, packed: bool = False):
    from alignment.losses import LossConfig
    from alignment.model import ModelConfig
    from alignment.module import AlignmentModule, StepConfig
    from alignment.optim import OptimConfig

    a = ctx.args
    return AlignmentModule(
        ModelConfig(name_or_path=ctx.model_dir, attn_implementation="sdpa_varlen" if packed else None),
        LossConfig(objective="en_x", bidirectional=False, temperature=1.0 / a.scale),
        OptimConfig(lr=a.lr, weight_decay=0.0, warmup_steps=0, warmup_ratio=0.0, schedule="constant",
                    fused=a.fused_adamw),
        step=StepConfig(unpadded="on") if packed else StepConfig(),
    )


def run_framework(ctx: Context, packed: bool = False) -> list[tuple[float, float]]:
    from lightning.pytorch import Callback, Trainer

    from alignment.callbacks import ThroughputLogger
    from alignment.data.datamodule import AlignmentDataModule

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.times: list[tuple[float, float]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.times.append(ctx.stamp(len(self.times)))

    timer = StepTimer()
    trainer = Trainer(
        accelerator="gpu" if ctx.device.type == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if ctx.bf16 else "32-true", max_steps=ctx.total_steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[ThroughputLogger(), timer],
        default_root_dir=str(ctx.work / "lightning"),
    )
    trainer.fit(framework_module(ctx, packed), datamodule=AlignmentDataModule(ctx.data, tokenizer=ctx.tokenizer))
    return timer.times


# --------------------------------------------------------------------------- arm: hand-written loop


def hand_embed(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, then L2 normalisation in float32: ``(N, D)``."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, T, H)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (N, H)
    return F.normalize(mean.float(), dim=-1)


def hand_loss(anchors: torch.Tensor, positives: torch.Tensor, scale: float) -> torch.Tensor:
    """In-batch-negatives InfoNCE, one direction: anchor i against every positive, target i."""
    logits = scale * anchors @ positives.T  # (B, B)
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def hand_model(ctx: Context):
    from transformers import AutoModel

    return AutoModel.from_pretrained(ctx.model_dir).to(ctx.device)


def run_hand(ctx: Context) -> list[tuple[float, float]]:
    model = hand_model(ctx).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=ctx.args.lr, weight_decay=0.0,
                                  fused=ctx.args.fused_adamw or None)
    tensors = []
    for b in ctx.batches:  # pre-tokenised, on the device before timing
        anchors, positives = pair_indices(b)
        tensors.append(tuple(t.to(ctx.device) for t in (b.input_ids, b.attention_mask, anchors, positives)))
    ctx.sync()
    times = []
    for input_ids, attention_mask, anchors, positives in tensors:
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.bf16):
            emb = hand_embed(model, input_ids, attention_mask)  # (2B, D)
        loss = hand_loss(emb[anchors], emb[positives], ctx.args.scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(ctx.stamp())
    return times


# --------------------------------------------------------------------------- arm: sentence-transformers


def st_missing() -> str | None:
    """Why the sentence-transformers arm cannot run, or None."""
    for name in ("sentence_transformers", "datasets", "accelerate"):
        try:
            module = __import__(name)
        except ImportError as exc:
            return f"{name} is not installed ({exc}); pip install 'multiway-align[bench]'"
        if name == "sentence_transformers" and int(module.__version__.split(".")[0]) < 6:
            return f"sentence-transformers {module.__version__} found, the arm uses the 6.x trainer API"
    return None


def st_trainer(ctx: Context, callbacks: list | None = None):
    """``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss`` over the framework's pairs, in its order."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from torch.utils.data import SequentialSampler

    a = ctx.args
    transformer = Transformer(ctx.model_dir, max_seq_length=a.max_length)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    model = SentenceTransformer(modules=[transformer, pooling], device=str(ctx.device))
    anchors, positives = ctx.pairs()
    dataset = Dataset.from_dict({"anchor": anchors, "positive": positives})

    def in_order(dataset, batch_size, drop_last, **kwargs):  # ST's default sampler class, no shuffling
        return DefaultBatchSampler(SequentialSampler(dataset), batch_size=batch_size, drop_last=drop_last, **kwargs)

    args = SentenceTransformerTrainingArguments(
        output_dir=str(ctx.work / "st"), max_steps=ctx.total_steps, per_device_train_batch_size=a.batch_size,
        learning_rate=a.lr, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch_fused" if a.fused_adamw else "adamw_torch", max_grad_norm=0.0,
        bf16=ctx.bf16, use_cpu=ctx.device.type == "cpu", dataloader_num_workers=ctx.data.num_workers, batch_sampler=in_order,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=a.seed,
    )
    loss = MultipleNegativesRankingLoss(model, scale=a.scale)
    return SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss, callbacks=callbacks)


def run_st(ctx: Context) -> list[tuple[float, float]]:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[tuple[float, float]] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(ctx.stamp(len(self.times)))

    timer = StepTimer()
    st_trainer(ctx, callbacks=[timer]).train()
    return timer.times


RUNNERS = {"framework": run_framework, "hand": run_hand, "sentence-transformers": run_st,
           PACKED: lambda ctx: run_framework(ctx, packed=True)}


# --------------------------------------------------------------------------- the loss check


def loss_check(ctx: Context, arms: list[str]) -> dict:
    """Each arm's loss on the first batch, same starting weights, eval mode (no dropout), fp32."""
    batch = ctx.batches[0].to(ctx.device)
    out: dict[str, Any] = {}
    with torch.no_grad():
        for arm in (a for a in FRAMEWORKS if a in arms):
            from alignment.losses import total_loss

            module = framework_module(ctx, packed=arm == PACKED).to(ctx.device).eval()
            out[arm] = float(total_loss(module._loss_terms(module._encode(batch), batch)))
            del module
        if "hand" in arms:
            model = hand_model(ctx).eval()
            anchors, positives = (t.to(ctx.device) for t in pair_indices(ctx.batches[0]))
            emb = hand_embed(model, batch.input_ids, batch.attention_mask)
            out["hand"] = float(hand_loss(emb[anchors], emb[positives], ctx.args.scale))
            del model
        if "sentence-transformers" in arms:
            trainer = st_trainer(ctx)
            trainer.model.eval()
            rows = [trainer.train_dataset[i] for i in range(ctx.args.batch_size)]
            inputs = trainer._prepare_inputs(trainer.data_collator(rows))
            real = sum(int(v.sum()) for k, v in inputs.items() if k.endswith("attention_mask"))
            out["sentence-transformers"] = float(trainer.compute_loss(trainer.model, inputs))
            out["st_real_tokens_first_batch"] = real
            del trainer
    values = [out[a] for a in arms if a in out]
    out["framework_real_tokens_first_batch"] = ctx.batches[0].real_tokens
    out["max_abs_diff"] = max(values) - min(values) if values else 0.0
    gc.collect()
    return out


# --------------------------------------------------------------------------- measuring


@dataclass
class Measurement:
    arm: str
    round: int
    seconds: float
    """Wall time of the timed steps (the warm-up steps excluded)."""
    cpu_seconds: float
    """CPU time of this process (all threads) over the same steps."""
    steps: int
    sentences: int
    real_tokens: int
    padded_tokens: int
    """Every token position the encoder processed (real + padding)."""
    model_flops: float
    step_seconds: list[float] = field(default_factory=list)
    peak_memory_gib: float | None = None
    threads: int | None = None
    """torch CPU threads after the arm ran (a library that changed them would show here)."""

    def rates(self) -> dict[str, float]:
        return {
            "sentences_per_s": self.sentences / self.seconds,
            "real_tokens_per_s": self.real_tokens / self.seconds,
            "padded_tokens_per_s": self.padded_tokens / self.seconds,
            "model_tflops_per_s": self.model_flops / self.seconds / 1e12,
            "step_s": self.seconds / self.steps,
            "cpu_s_per_step": self.cpu_seconds / self.steps,
        }


def measure(ctx: Context, arm: str, round_: int, flops: FlopModel) -> Measurement:
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(ctx.args.seed + round_)
    times = RUNNERS[arm](ctx)
    w, s = ctx.args.warmup_steps, ctx.args.steps
    if len(times) != ctx.total_steps:
        raise RuntimeError(f"{arm}: {len(times)} steps timed, expected {ctx.total_steps}")
    timed = ctx.batches[w:w + s]
    shapes = [shape for b in timed for shape in forward_shapes(arm, b)]
    walls = [t[0] for t in times]
    return Measurement(
        arm=arm, round=round_, seconds=walls[-1] - walls[w - 1], cpu_seconds=times[-1][1] - times[w - 1][1], steps=s,
        sentences=sum(b.num_sentences for b in timed),
        real_tokens=sum(b.real_tokens for b in timed),
        padded_tokens=sum(n * width for n, width in shapes),
        model_flops=sum(flops.batch_flops(n, width) for n, width in shapes),
        step_seconds=[round(t1 - t0, 6) for t0, t1 in zip(walls[w - 1:-1], walls[w:])],
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if ctx.device.type == "cuda" else None,
        threads=torch.get_num_threads(),
    )


def peak_tflops(device: torch.device, bf16: bool, override: float | None) -> tuple[float | None, str]:
    """The peak the MFU is relative to, and where it came from."""
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak known for a CPU (give --peak-tflops)"
    if not bf16:
        return None, "the table holds bf16 peaks; fp32 runs need --peak-tflops"
    name = torch.cuda.get_device_name(device)
    found = lookup_peak(name)
    if found is None:
        return None, f"{name} is not in the peak table (give --peak-tflops)"
    return found[1], f"bf16 dense peak of {found[0]}, {found[1]:g} TFLOP/s ({name})"


def lookup_peak(device_name: str) -> tuple[str, float] | None:
    """``(table key, bf16 dense TFLOP/s)`` of the first :data:`PEAK_BF16_TFLOPS` key in ``device_name``."""
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return key, value
    return None


def summarise(measurements: list[Measurement], arms: list[str], peak: float | None) -> tuple[dict, dict]:
    summary = {}
    for arm in arms:
        mine = [m.rates() for m in measurements if m.arm == arm]
        entry = {key: statistics.median(r[key] for r in mine) for key in mine[0]}
        spread = [r["sentences_per_s"] for r in mine]
        entry["sentences_per_s_min"], entry["sentences_per_s_max"] = min(spread), max(spread)
        if peak:
            entry["mfu"] = entry["model_tflops_per_s"] / peak
        memory = [m.peak_memory_gib for m in measurements if m.arm == arm and m.peak_memory_gib is not None]
        if memory:
            entry["peak_memory_gib"] = max(memory)
        summary[arm] = entry
    ratios = {}
    rounds = sorted({m.round for m in measurements})
    by = {(m.arm, m.round): m.rates() for m in measurements}
    pairs = [(mine, other) for mine in FRAMEWORKS for other in ("hand", "sentence-transformers", "framework")
             if mine != other and mine in arms and other in arms]
    for mine, other in pairs:
        per_round = [by[(mine, r)]["sentences_per_s"] / by[(other, r)]["sentences_per_s"] for r in rounds]
        extra = [by[(mine, r)]["step_s"] - by[(other, r)]["step_s"] for r in rounds]
        cpu = [by[(other, r)]["cpu_s_per_step"] / by[(mine, r)]["cpu_s_per_step"] for r in rounds]
        ratios[f"{mine}/{other}"] = {"median": statistics.median(per_round), "min": min(per_round),
                                        "max": max(per_round), "per_round": per_round,
                                        "step_s_difference_median": statistics.median(extra),
                                        "cpu_time_median": statistics.median(cpu), "cpu_time_min": min(cpu),
                                        "cpu_time_max": max(cpu)}
    return summary, ratios


# --------------------------------------------------------------------------- machine and report


def write_results(results: dict, out: Path) -> tuple[Path, Path]:
    stem = result_stem("train_throughput", results["date"], results["model_tag"], machine_tag(results["machine"]))
    return write_report(out, stem, markdown(results), results)


ARM_LABELS = {
    "framework": "framework (`Trainer.fit`, datamodule, AlignmentModule)",
    "hand": "hand-written PyTorch loop (pre-tokenised)",
    "sentence-transformers": "sentence-transformers trainer + MNRL",
    PACKED: "framework, unpadded steps (`--model.step.unpadded on`, sdpa_varlen)",
}


def markdown(results: dict) -> str:
    m, c = results["machine"], results["config"]
    lines = [
        f"# Training throughput, {results['date'][:10]}",
        "",
        *machine_lines(m, PACKAGES),
        f"- 1-minute load average at end {results['load_avg_1m_at_end']}",
        f"- command: `{results['command']}`",
        f"- date: {results['date']}",
        f"- model: {results['model']}; {results['flops']['layers']} layers, hidden {results['flops']['hidden']}, "
        f"{results['flops']['total_params'] / 1e6:.3g}M parameters ({results['flops']['layer_params'] / 1e6:.3g}M "
        "in the transformer layers)",
        f"- batch: {c['batch_size']} en-de pairs ({2 * c['batch_size']} sentences), max_length {c['max_length']}, "
        f"corpus {c['corpus']} (pivot text >= {c['min_words']} words), mean {results['data']['mean_real_tokens']:.1f} "
        f"real tokens per sentence, padding {results['data']['padding_ratio']:.1%} of token positions",
        f"- training: {c['precision']} on {c['device']}, AdamW lr {c['lr']} (no weight decay, constant, no clipping"
        f"{', fused' if c['fused_adamw'] else ''}), loss scale {c['scale']} (temperature {1 / c['scale']:g}); "
        f"{c['warmup_steps']} warm-up + {c['steps']} timed steps per arm and round, {c['rounds']} rounds "
        f"(arm order rotated); data workers {c['num_workers']} (framework and sentence-transformers; CPU time counted)"
        + (", pre-tokenised shards (`align shards tokenize` sidecars)" if c.get("pretokenized") else ", tokenising in the loader"),
        "",
    ]
    has_mfu = any("mfu" in s for s in results["summary"].values())
    lines.append(markdown_table(
        ["arm", "step (s)", "sentences/s", "real tokens/s", "tokens/s incl. padding", "model TFLOP/s",
         *(["MFU"] if has_mfu else []), "sentences/s over rounds", "CPU s/step"],
        [[ARM_LABELS[arm], f"{s['step_s']:.3f}", f"{s['sentences_per_s']:.1f}", f"{s['real_tokens_per_s']:.0f}",
          f"{s['padded_tokens_per_s']:.0f}", f"{s['model_tflops_per_s']:.3g}", *([f"{s['mfu']:.1%}"] if has_mfu else []),
          f"{s['sentences_per_s_min']:.1f} - {s['sentences_per_s_max']:.1f}", f"{s['cpu_s_per_step']:.3f}"]
         for arm, s in results["summary"].items()],
        "lrrrrr" + ("r" if has_mfu else "") + "lr",
    ))
    if results["ratios"]:
        lines += ["", markdown_table(
            ["throughput ratio", "sentences/s, median", "min - max over rounds", "framework step minus the other's (s)",
             "by CPU time, median (min - max)"],
            [[name, f"{r['median']:.3f}", f"{r['min']:.3f} - {r['max']:.3f}", f"{r['step_s_difference_median']:+.4f}",
              f"{r['cpu_time_median']:.3f} ({r['cpu_time_min']:.3f} - {r['cpu_time_max']:.3f})"]
             for name, r in results["ratios"].items()],
            "lrlrl",
        )]
    lc = results["loss_check"]
    shown = ", ".join(f"{a} {lc[a]:.6f}" for a in results["config"]["arms"] if a in lc)
    lines += [
        "",
        f"Loss on the first batch from the same weights (eval mode, fp32): {shown}; "
        f"largest difference {lc['max_abs_diff']:.2e}.",
    ]
    if results.get("skipped"):
        lines.append(f"Skipped: {results['skipped']}.")
    lines += [
        "",
        f"Peak for MFU: {results['peak']['source']}. Model FLOPs per token = 6 N + 12 L H T (N = transformer-layer "
        "parameters, T = padded width of the batch), forward + backward, over every processed token position.",
        "Step time = wall time between the ends of consecutive optimiser steps (data loading included), median "
        "over rounds; ratios are per round, then the median. CPU s/step is the CPU time of this process (all its "
        "threads) and of its DataLoader workers: far less sensitive than wall time to other jobs on a shared machine, so the CPU-time ratio "
        "(the other arm's CPU time per step over the framework's) is the steadier estimate of relative cost "
        "there; on a GPU it only measures the host side. The loss maths is the same in every arm; what "
        "differs is the machinery around it: the framework streams shards through its datamodule, builds a "
        "`Batch`, gathers candidates, computes the loss with its metrics and logs them (plus the gradient norm "
        "and the throughput callback); sentence-transformers tokenises in its collator and computes the "
        "gradient norm, and encodes the anchor and positive columns in two forwards (its default "
        "`embed_columns(separate_first=True)`), each padded to its own column's longest sentence, where the "
        "framework and the hand loop run one forward over all sentences padded to the batch's longest; the hand "
        "loop does none of this. Tokens/s incl. padding and model FLOP/s count each arm's own forwards.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", help="a local Hugging Face folder with weights and tokenizer (e.g. demo_out/e5)")
    model.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), default=None,
                       help="build this architecture with random weights instead (default: tiny)")
    p.add_argument("--tokenizer", help="tokenizer folder for --model-config (default: the synthetic tiny tokenizer)")
    p.add_argument("--arms", default=",".join(ARMS),
                   help=f"comma-separated arms (default: %(default)s; also {PACKED}: unpadded steps, which need "
                        "--attention-dropout 0 with --model-config, PyTorch's varlen kernel having no dropout)")
    p.add_argument("--attention-dropout", type=float, default=None,
                   help="attention dropout of the --model-config architecture, every arm (default: the config's)")
    p.add_argument("--corpus", choices=("synthetic", "gettext"), default="synthetic",
                   help="en-de rows: synthetic, or the Django + Wagtail gettext catalogs (default: %(default)s)")
    p.add_argument("--min-words", type=int, default=5, help="minimum words of the English text (default: %(default)s)")
    p.add_argument("--max-words", type=int, default=16, help="maximum words of synthetic rows (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per step (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per sentence (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps per arm and round (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per arm and round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of all arms (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--scale", type=float, default=20.0, help="logit scale = 1 / temperature (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("auto", "32", "bf16"), default="auto",
                   help="auto: bf16 (mixed) on CUDA, 32 on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers of the framework and sentence-transformers arms (default: 1 on CPU, "
                   "beside one torch thread on a 2-core machine; 2 on CUDA); their CPU time is counted")
    p.add_argument("--pretokenized", action="store_true",
                   help="write `align shards tokenize` sidecars first: the framework's loader reads token ids "
                        "instead of tokenising (the hand loop is pre-tokenised)")
    p.add_argument("--fused-adamw", action="store_true", help="fused AdamW kernel in every arm")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: table by GPU name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: benchmarks/results)")
    args = p.parse_args(argv)
    args.arm_list = [a.strip() for a in args.arms.split(",") if a.strip()]
    for name in args.arm_list:
        if name not in ALL_ARMS:
            p.error(f"--arms: unknown arm {name!r}; choose from {', '.join(ALL_ARMS)}")
    if PACKED in args.arm_list and (args.model or args.attention_dropout != 0):
        p.error(f"--arms {PACKED}: needs --model-config with --attention-dropout 0 (the varlen kernel has no "
                "attention dropout; every arm then trains the same model)")
    if args.attention_dropout is not None and (args.model or not 0 <= args.attention_dropout < 1):
        p.error("--attention-dropout goes with --model-config and must be in [0, 1)")
    checks = {"--batch-size": (args.batch_size, 2), "--max-length": (args.max_length, 4),
              "--warmup-steps": (args.warmup_steps, 1), "--steps": (args.steps, 1), "--rounds": (args.rounds, 1),
              "--min-words": (args.min_words, 1)}
    for flag, (value, low) in checks.items():
        if value < low:
            p.error(f"{flag} must be >= {low}, got {value}")
    if args.max_words < args.min_words:
        p.error(f"--max-words ({args.max_words}) must be >= --min-words ({args.min_words})")
    if args.tokenizer and args.model:
        p.error("--tokenizer goes with --model-config; --model folders carry their own tokenizer")
    return args


@contextlib.contextmanager
def _quiet_libraries():
    """The libraries' info logs and two known warnings off while the benchmark runs, restored after it (a caller
    in the same process, e.g. a test, keeps its own logging)."""
    names = ("lightning.pytorch", "lightning.fabric", "sentence_transformers", "transformers")
    levels = {name: logging.getLogger(name).level for name in names}
    with warnings.catch_warnings():
        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with _quiet_libraries():
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    workers = args.num_workers if args.num_workers is not None else (2 if device.type == "cuda" else 1)
    arms, skipped = list(args.arm_list), None
    if "sentence-transformers" in arms and (reason := st_missing()):
        arms.remove("sentence-transformers")
        skipped = f"sentence-transformers arm: {reason}"
        print(f"[train_throughput] skipping the {skipped}")
    if not arms:
        raise SystemExit("--arms: nothing left to run")
    command = command_line("train_throughput.py", argv)
    machine = machine_info(*PACKAGES, device=device)

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="train_throughput-") as tmp:
        work = Path(tmp)
        if args.model:
            if not (Path(args.model) / "config.json").is_file():
                raise SystemExit(f"--model {args.model}: not a Hugging Face folder (no config.json)")
            model_dir, model_label, tag = args.model, f"{args.model} (pretrained weights)", Path(args.model).name
        else:
            name = args.model_config or "tiny"
            model_dir = build_random_model(name, args.tokenizer, args.max_length, work / "model", args.seed,
                                           args.attention_dropout)
            tok_note = f"tokenizer {args.tokenizer}" if args.tokenizer else "synthetic word-level tokenizer"
            model_label, tag = f"{name} architecture, random weights ({tok_note})", name
        flops = FlopModel.of(model_dir, args.max_length)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        n = args.batch_size * (args.warmup_steps + args.steps)
        rows = corpus_rows(args.corpus, n, args.min_words, args.max_words, args.seed)
        shards = write_shards(rows, work / "shards", args.batch_size, args.seed)
        if args.pretokenized:
            pretokenize(shards, tokenizer, args.max_length)
        config = data_config(args, shards, model_dir, workers)
        ctx = Context(args, device, bf16, model_dir, tokenizer, config, [], {r.id: r.texts for r in rows}, work)
        ctx.batches = stream_batches(config, tokenizer, ctx.total_steps)
        check = loss_check(ctx, arms)
        print("[train_throughput] loss on the first batch (eval, fp32): "
              + ", ".join(f"{a} {check[a]:.6f}" for a in arms))
        measurements = []
        for r in range(args.rounds):
            order = arms[r % len(arms):] + arms[:r % len(arms)]
            for arm in order:
                m = measure(ctx, arm, r, flops)
                measurements.append(m)
                print(f"[train_throughput] round {r} {arm}: {m.rates()['step_s']:.3f} s/step, "
                      f"{m.rates()['sentences_per_s']:.1f} sentences/s")

    peak, peak_source = peak_tflops(device, bf16, args.peak_tflops)
    summary, ratios = summarise(measurements, arms, peak)
    real = sum(b.real_tokens for b in ctx.batches)
    positions = sum(b.input_ids.numel() for b in ctx.batches)
    results = {
        "date": now(),
        "command": command,
        "machine": machine,
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "model": model_label,
        "model_tag": tag,
        "config": {"arms": arms, "batch_size": args.batch_size, "max_length": args.max_length,
                   "corpus": args.corpus, "min_words": args.min_words, "max_words": args.max_words,
                   "warmup_steps": args.warmup_steps, "steps": args.steps, "rounds": args.rounds, "lr": args.lr,
                   "scale": args.scale, "precision": "bf16-mixed" if bf16 else "fp32", "device": str(device),
                   "num_workers": workers, "attention_dropout": args.attention_dropout,
                   "pretokenized": args.pretokenized, "fused_adamw": args.fused_adamw, "seed": args.seed},
        "compared": ("one-directional InfoNCE, in-batch negatives: en anchor vs the batch's de sentences, "
                     f"scale {args.scale}; framework: objective en_x, bidirectional false, language_policy "
                     f"pivot_pair; sentence-transformers: MultipleNegativesRankingLoss(scale={args.scale}) on "
                     "(anchor=en, positive=de); hand: cross-entropy over scale * cos"),
        "flops": {"layers": flops.layers, "hidden": flops.hidden, "layer_params": flops.layer_params,
                  "total_params": flops.total_params, "formula": "6 * N + 12 * L * H * T per token, fwd + bwd"},
        "peak": {"tflops": peak, "source": peak_source},
        "data": {"rows": len(rows), "mean_real_tokens": real / sum(b.num_sentences for b in ctx.batches),
                 "padding_ratio": 1 - real / positions},
        "loss_check": check,
        "skipped": skipped,
        "summary": summary,
        "ratios": ratios,
        "measurements": [m.__dict__ | m.rates() for m in measurements],
    }
    print(markdown(results))
    md, js = write_results(results, args.out)
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
