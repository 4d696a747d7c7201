"""Streaming training batches from WebDataset shards.

The contract with the rest of the framework is :class:`Batch`: one flat
``[N, T]`` token tensor holding every sentence of every row in the local batch,
plus, per sentence, the batch-local row index and the language index, so a loss
knows which embeddings translate one another.

The pipeline, per DataLoader worker of each rank::

    shards of this (rank, worker)          plan_epoch: per-epoch seeded permutation, identical on
      -> tar members <key>.json            every rank, balanced by row counts (finite mode), or
      -> parsed rows (bad ones skipped      shards drawn with replacement (resampled mode)
         and counted by reason)
      -> shuffle buffer (webdataset)
      -> language selection (all | k | pivot_pair)
      -> planned batch sizes, optionally length-bucketed
      -> one fast-tokenizer call per batch (or per bucket), padding
      -> Batch

Equal batch counts on every rank (finite mode). A rank that yields fewer
batches than the others hangs or aborts the next collective (gloo dies with
SIGABRT). :func:`plan_epoch` therefore plans the whole epoch from the per-shard
row counts before any worker starts: every rank computes the same plan, yields
exactly ``EpochPlan.batches_per_rank`` batches, and no row is read twice.
Ranks with fewer rows get smaller batches rather than fewer batches. A worker
always emits its planned number of batches, even when corrupt samples leave it
short of rows: the batches are then smaller, possibly empty (``num_rows == 0``,
``input_ids`` of shape ``(0, 0)``). The loss side must pad and mask unequal
local batch sizes.

Rank capture. The rank and world size are read once, through
``alignment.distributed``, when the stream is constructed in the main process,
and stored on it. Workers (fork or spawn) use the stored values: a spawned
worker has neither ``RANK`` nor a process group, and webdataset's own node
split would silently give it every shard.

Resume. webdataset keeps no mid-epoch state. ``MultiWayStream.set_epoch(epoch,
start_batch)`` restarts an epoch at a batch: in finite mode each worker replays
its rows up to its share of the first ``start_batch`` batches without
tokenising them, so the rest of the epoch holds exactly the batches that an
uninterrupted run would have produced (the interleaving of workers may
differ); in resampled mode the stream is reseeded by ``(seed, epoch,
start_batch)``, which is reproducible but not a continuation.

Skipped samples are counted by reason (:data:`SKIP_REASONS`) in each worker,
warned once per reason per worker and epoch with the shard and sample key, and
each Batch carries its worker's cumulative counts (``Batch.skip_counts``) so
the main process can aggregate them (see ``AlignmentDataModule.skip_counts``).
"""

from __future__ import annotations

import gc
import heapq
import itertools
import json
import math
import random
import tarfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from alignment.data.corpus import LanguageCodeError, normalize_language

FLAG_PREFIX = "--data.config."
"""How the user spells this config's fields on the command line (``--data.config.config.batch_size``)."""

LanguagePolicy = Literal["all", "k", "pivot_pair"]
LANGUAGE_POLICIES: tuple[str, ...] = ("all", "k", "pivot_pair")

SKIP_REASONS: dict[str, str] = {
    "corrupt_tar": "a shard is truncated or not a valid tar: the rest of that shard is lost (counted once per shard)",
    "unreadable_shard": "a shard could not be opened (counted once per shard)",
    "bad_json": "a sample's .json payload does not parse or is not an object with 'id' and a 'texts' mapping",
    "unknown_language": "a sample has a language code that is not a valid BCP-47 tag",
    "no_usable_text": "a sample has fewer than two non-empty texts in the configured languages",
    "no_pivot": "language policy pivot_pair and the sample has no usable pivot text",
    "unplanned_rows": "rows beyond the shard row counts the epoch was planned with (a stale manifest); dropped",
}
"""Why a sample (or a shard) is skipped; the keys of ``Batch.skip_counts``."""


# --------------------------------------------------------------------------- Batch


@dataclass
class Batch:
    """A collated local batch of multi-way rows.

    Attributes:
        input_ids: ``(N, T)`` long, every sentence of every row, padded to ``T``.
        attention_mask: ``(N, T)`` long, 1 on real tokens.
        row_ids: ``(N,)`` long, batch-local row index in ``[0, num_rows)``.
            Sentences with the same row id translate one another. Offsetting by
            rank to make them global is ``alignment.distributed``'s job.
        lang_ids: ``(N,)`` long, index into ``languages``.
        languages: the language vocabulary, identical on every rank (sorted
            canonical codes), so language ids agree across ranks.
        pivot_lang_id: index of the pivot language in ``languages``.
        row_keys: ``(num_rows,)`` dataset row ids, for debugging and eval.
        skip_counts: cumulative skipped-sample counts by reason (keys of
            :data:`SKIP_REASONS`) of the worker that built this batch, since the
            start of the epoch. Cumulative, so the latest batch of each worker
            gives that worker's total; aggregate per ``origin``.
        origin: ``(epoch, worker id)`` of the worker that built the batch
            (worker 0 when the DataLoader has no workers).
    """

    input_ids: Tensor
    attention_mask: Tensor
    row_ids: Tensor
    lang_ids: Tensor
    languages: tuple[str, ...]
    pivot_lang_id: int
    row_keys: tuple[str, ...]
    skip_counts: dict[str, int] = field(default_factory=dict)
    origin: tuple[int, int] = (0, 0)

    @property
    def num_sentences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_rows(self) -> int:
        return len(self.row_keys)

    @property
    def real_tokens(self) -> int:
        """Non-pad tokens (a device-to-host sync if the mask is on GPU)."""
        return int(self.attention_mask.sum())

    @property
    def padded_tokens(self) -> int:
        return int(self.attention_mask.numel()) - self.real_tokens

    @property
    def padding_ratio(self) -> float:
        total = self.attention_mask.numel()
        return self.padded_tokens / total if total else 0.0

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(
            self,
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            row_ids=move(self.row_ids),
            lang_ids=move(self.lang_ids),
        )

    def pin_memory(self) -> "Batch":
        """Called by ``DataLoader(pin_memory=True)``."""
        return replace(
            self,
            input_ids=self.input_ids.pin_memory(),
            attention_mask=self.attention_mask.pin_memory(),
            row_ids=self.row_ids.pin_memory(),
            lang_ids=self.lang_ids.pin_memory(),
        )


# --------------------------------------------------------------------------- config


def flag(name: str) -> str:
    """A config field as the user types it: ``flag('batch_size') == '--data.config.batch_size'``."""
    return f"{FLAG_PREFIX}{name}"


def _normalize_flag_language(code: str, field_name: str) -> str:
    try:
        return normalize_language(code)
    except LanguageCodeError as exc:
        raise ValueError(f"{flag(field_name)}: {exc}") from None


@dataclass
class StreamConfig:
    """What the stream does with the rows: batch size, language policy, tokenisation, shuffling, epochs.

    ``DataConfig`` (in ``alignment.data.datamodule``) extends it with shard specs,
    workers and the tokenizer; the fields here are everything a
    :class:`MultiWayStream` needs.
    """

    batch_size: int = 32
    """Rows (not sentences) per batch on each rank. A row brings one sentence per selected language."""
    language_policy: LanguagePolicy = "all"
    """Which languages of a row go into the batch: `all` (multi-way: every language of the row), `k` (`k`
    languages sampled per row) or `pivot_pair` (the pivot plus one sampled language: the En-X baseline)."""
    k: int = 2
    """Languages sampled per row with `--data.config.language_policy k` (rows with fewer usable languages keep all)."""
    languages: list[str] | str | None = None
    """Languages to train on (BCP-47; normalised and sorted), as a list or comma-separated (`en,de,fr`). Texts in
    other languages are dropped. Also the language vocabulary (language ids index this sorted list); default:
    the manifest's languages."""
    pivot: str = "en"
    """The pivot language (English-centric baseline and evaluation); must be in the vocabulary."""
    max_length: int = 128
    """Tokens per sentence, special tokens included; longer sentences are truncated."""
    text_prefix: str = ""
    """Prepended to every sentence before tokenising (E5 models expect `query: ` or `passage: `)."""
    shuffle_buffer: int = 1000
    """Rows in each worker's shuffle buffer (0: no sample shuffling; shards are still shuffled per epoch)."""
    seed: int = 0
    """Seeds the shard permutation (with the epoch: the same on every rank), the buffers and language sampling."""
    resampled: bool = False
    """Draw shards with replacement forever (for long runs); an epoch is then `--data.config.steps_per_epoch` batches."""
    samples_per_epoch: int | None = None
    """Resampled mode: rows per epoch summed over all ranks (rounded up to whole global batches)."""
    steps_per_epoch: int | None = None
    """Resampled mode: batches per epoch on each rank (alternative to `--data.config.samples_per_epoch`)."""
    bucketing: bool = False
    """Length bucketing: sort `--data.config.bucket_buffer` rows by token length, cut batches, shuffle their order."""
    bucket_buffer: int = 1024
    """Rows sorted together when `--data.config.bucketing` is on (at least `--data.config.batch_size`)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"{flag('batch_size')} must be >= 1 (rows per rank), got {self.batch_size}")
        if self.language_policy not in LANGUAGE_POLICIES:
            raise ValueError(
                f"{flag('language_policy')} must be one of {', '.join(LANGUAGE_POLICIES)}, got {self.language_policy!r}"
            )
        if self.language_policy == "k" and self.k < 2:
            raise ValueError(f"{flag('k')} must be >= 2 (a row needs a translation pair), got {self.k}")
        self.pivot = _normalize_flag_language(self.pivot, "pivot")
        if self.languages is not None:
            self.languages = self._checked_languages(self.languages)
        if self.max_length < 2:
            raise ValueError(f"{flag('max_length')} must be >= 2 tokens, got {self.max_length}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"{flag('shuffle_buffer')} must be >= 0 rows, got {self.shuffle_buffer}")
        if self.bucketing and self.bucket_buffer < self.batch_size:
            raise ValueError(
                f"{flag('bucket_buffer')} must be >= {flag('batch_size')} ({self.batch_size}) "
                f"when {flag('bucketing')} is on, got {self.bucket_buffer}"
            )
        self._check_epoch_length()

    def _checked_languages(self, languages: Sequence[str]) -> list[str]:
        if isinstance(languages, str):  # `--data.config.languages en,de`, as every other command takes them
            languages = [code.strip() for code in languages.split(",") if code.strip()]
        codes = sorted({_normalize_flag_language(code, "languages") for code in languages})
        if len(codes) < 2:
            raise ValueError(f"{flag('languages')} needs at least two languages, got {codes}")
        if self.pivot not in codes:
            raise ValueError(
                f"{flag('pivot')}={self.pivot} is not in {flag('languages')} {codes}: add it or change the pivot"
            )
        check_k(self, codes)
        return codes

    def _check_epoch_length(self) -> None:
        lengths = {"samples_per_epoch": self.samples_per_epoch, "steps_per_epoch": self.steps_per_epoch}
        given = {name: value for name, value in lengths.items() if value is not None}
        if not self.resampled:
            if given:
                name = next(iter(given))
                raise ValueError(
                    f"{flag(name)} only applies with {flag('resampled')} true; a finite epoch reads every row once"
                )
            return
        if len(given) != 1:
            raise ValueError(
                f"{flag('resampled')} true needs exactly one of {flag('samples_per_epoch')} or "
                f"{flag('steps_per_epoch')} (an infinite stream has no natural epoch), got {given or 'neither'}"
            )
        name, value = next(iter(given.items()))
        if value < 1:
            raise ValueError(f"{flag(name)} must be >= 1, got {value}")

    def resampled_batches_per_rank(self, world_size: int) -> int:
        """Batches per rank per epoch in resampled mode."""
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        assert self.samples_per_epoch is not None
        return math.ceil(self.samples_per_epoch / (self.batch_size * world_size))


def check_k(config: StreamConfig, vocabulary: Sequence[str]) -> None:
    """Refuse ``k`` larger than the languages present (an impossible config)."""
    if config.language_policy == "k" and config.k > len(vocabulary):
        raise ValueError(
            f"{flag('k')}={config.k} but only {len(vocabulary)} languages are present "
            f"({', '.join(vocabulary)}): lower {flag('k')} or add languages"
        )


# --------------------------------------------------------------------------- shards and plans


@dataclass(frozen=True)
class ShardRef:
    """A shard to read: a local file path (opened as a plain file, never as a URL) and its row count."""

    url: str
    rows: int | None = None


def as_shard_refs(shards: Iterable[Any]) -> list[ShardRef]:
    """Normalise shard inputs: paths, URLs, :class:`ShardRef`, or objects with ``url`` and ``rows`` (``ShardInfo``)."""
    refs = []
    for item in shards:
        if isinstance(item, ShardRef):
            refs.append(item)
        elif isinstance(item, (str, Path)):
            refs.append(ShardRef(str(item)))
        elif hasattr(item, "url"):
            refs.append(ShardRef(str(item.url), getattr(item, "rows", None)))
        else:
            raise TypeError(f"not a shard: {item!r} (expected a path, URL or ShardInfo)")
    return refs


def count_shard_rows(url: str) -> int:
    """Count the samples (``.json`` members) of a local tar by scanning its headers.

    Cost: one 512-byte header read and a seek per member; no payload is read or
    parsed. Python's header parsing dominates: about 40 µs a member (0.8 s for
    a 20k-row shard) measured on a loaded 2-core Xeon, paid on every rank at
    stream construction. Manifests carry the counts and make this unnecessary.
    A truncated or corrupt tar counts the members before the damage. Only local
    files can be counted; other URLs need a manifest with row counts.
    """
    path = url[len("file:") :] if url.startswith("file:") else url
    if not Path(path).is_file():
        raise ValueError(
            f"shard {url} has no row count and is not a local file: give shards through a manifest "
            "(align shards writes one) so the epoch can be planned"
        )
    keys = set()
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if member.isreg() and member.name.endswith(".json"):
                    keys.add(member.name[: -len(".json")])
    except (tarfile.TarError, EOFError, OSError):
        pass  # counted up to the damage; the reader counts the shard as corrupt
    return len(keys)


def with_row_counts(shards: Sequence[ShardRef]) -> list[ShardRef]:
    """Fill in unknown row counts by scanning tar headers (see :func:`count_shard_rows` for the cost)."""
    return [s if s.rows is not None else ShardRef(s.url, count_shard_rows(s.url)) for s in shards]


@dataclass(frozen=True)
class WorkerPlan:
    """What one DataLoader worker of one rank reads and emits in one epoch."""

    shards: tuple[ShardRef, ...]
    """Read in this order (the epoch's permutation order)."""
    batch_sizes: tuple[int, ...]
    """Planned rows of each batch this worker emits, in order; all <= batch_size."""

    @property
    def rows(self) -> int:
        return sum(s.rows or 0 for s in self.shards)


@dataclass(frozen=True)
class EpochPlan:
    """The whole epoch's assignment of shards to (rank, worker) slots, computed identically on every rank."""

    epoch: int
    order: tuple[str, ...]
    """Shard URLs in this epoch's permutation (identical on every rank, different per epoch)."""
    slots: tuple[tuple[WorkerPlan, ...], ...]
    """``slots[rank][worker]``."""

    @property
    def batches_per_rank(self) -> int:
        """Batches every rank yields this epoch (equal on all ranks by construction)."""
        return sum(len(w.batch_sizes) for w in self.slots[0])

    def worker_batch_counts(self, rank: int) -> list[int]:
        return [len(w.batch_sizes) for w in self.slots[rank]]


def permute_shards(shards: Sequence[ShardRef], seed: int, epoch: int) -> list[ShardRef]:
    """This epoch's shard order: a permutation seeded by ``(seed, epoch)``, so identical on every rank."""
    order = list(shards)
    random.Random(f"{seed}/shards/{epoch}").shuffle(order)
    return order


def assign_shards(shards: Sequence[ShardRef], num_slots: int) -> list[list[ShardRef]]:
    """Balance shards over slots by rows: longest-processing-time greedy.

    Shards are taken largest first (ties in the given order, i.e. the epoch's
    permutation) and each goes to the slot with the fewest rows (ties to the
    lowest slot). The slot totals depend only on the multiset of shard sizes,
    so they, and the batch counts, are the same every epoch; which shard lands
    where changes with the permutation.
    """
    heap = [(0, slot) for slot in range(num_slots)]
    assigned: list[list[int]] = [[] for _ in range(num_slots)]
    for i in sorted(range(len(shards)), key=lambda i: (-(shards[i].rows or 0), i)):
        rows, slot = heapq.heappop(heap)
        assigned[slot].append(i)
        heapq.heappush(heap, (rows + (shards[i].rows or 0), slot))
    return [[shards[i] for i in sorted(slot)] for slot in assigned]  # read in permutation order, not size order


def batch_counts_for_rank(worker_rows: Sequence[int], batch_size: int, total_batches: int) -> list[int]:
    """Batches per worker so that the rank yields ``total_batches``, each batch at most ``batch_size`` rows.

    Starts from ``ceil(rows / batch_size)`` per worker and hands each extra
    batch to the worker whose batches are currently the fullest.
    """
    counts = [math.ceil(rows / batch_size) for rows in worker_rows]
    if sum(counts) > total_batches:
        raise AssertionError(f"rank needs {sum(counts)} batches but the epoch has {total_batches}")

    def fullness(w: int) -> float:
        # workers without rows take extra (empty) batches only when no worker of the rank has rows
        return worker_rows[w] / counts[w] if counts[w] else (math.inf if worker_rows[w] else -1.0)

    for _ in range(total_batches - sum(counts)):
        counts[max(range(len(counts)), key=lambda w: (fullness(w), -w))] += 1
    return counts


def split_rows(rows: int, batches: int) -> tuple[int, ...]:
    """``rows`` into ``batches`` sizes as even as possible (larger first): 10 into 3 -> (4, 3, 3)."""
    if batches == 0:
        return ()
    base, extra = divmod(rows, batches)
    return tuple(base + 1 if i < extra else base for i in range(batches))


def plan_epoch(
    shards: Sequence[ShardRef],
    *,
    world_size: int,
    num_workers: int,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> EpochPlan:
    """Plan a finite epoch: which (rank, worker) reads which shards and how many rows go in each batch.

    Args:
        shards: every shard of the split, with row counts (see :func:`with_row_counts`).
        world_size: number of ranks.
        num_workers: DataLoader workers per rank (0 plans one in-process reader).
        batch_size: maximum rows per batch.
        seed, epoch: seed the shard permutation (identical on every rank).
        shuffle: permute shards per epoch (off for validation).

    Every rank yields ``N = max over ranks of sum over its workers of
    ceil(worker rows / batch_size)`` batches; ranks below ``N`` split their rows
    into more, smaller batches. Slots interleave ranks (slot ``s`` is rank
    ``s % world_size``, worker ``s // world_size``) so the greedy balance spreads
    large shards across ranks first.

    Raises:
        ValueError: fewer shards than ``world_size * workers`` (some worker would read nothing).
    """
    workers = max(1, num_workers)
    refs = list(shards)
    if any(s.rows is None for s in refs):
        raise ValueError("plan_epoch needs row counts for every shard: use with_row_counts() first")
    if len(refs) < world_size * workers:
        raise ValueError(
            f"finite mode needs at least one shard per reader: {world_size} rank(s) x {workers} worker(s) = "
            f"{world_size * workers} readers but only {len(refs)} shard(s). Lower {flag('num_workers')}, write more, "
            f"smaller shards (align shards build --rows-per-shard N), or set {flag('resampled')} true"
        )
    order = permute_shards(refs, seed, epoch) if shuffle else refs
    assigned = assign_shards(order, world_size * workers)
    slots = [[assigned[w * world_size + r] for w in range(workers)] for r in range(world_size)]
    worker_rows = [[sum(s.rows for s in slot) for slot in rank_slots] for rank_slots in slots]
    total = max(sum(math.ceil(rows / batch_size) for rows in rank_rows) for rank_rows in worker_rows)
    plans = []
    for rank_slots, rank_rows in zip(slots, worker_rows):
        counts = batch_counts_for_rank(rank_rows, batch_size, total)
        plans.append(
            tuple(
                WorkerPlan(tuple(slot), split_rows(rows, n)) for slot, rows, n in zip(rank_slots, rank_rows, counts)
            )
        )
    return EpochPlan(epoch=epoch, order=tuple(s.url for s in order), slots=tuple(plans))


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` batches over ``parts`` workers, earlier workers first: 7 over 3 -> [3, 2, 2]."""
    base, extra = divmod(total, parts)
    return [base + 1 if i < extra else base for i in range(parts)]


def round_robin_taken(counts: Sequence[int], batches: int) -> list[int]:
    """How many of the first ``batches`` batches of a rank came from each worker.

    A ``DataLoader`` with ``in_order=True`` returns worker batches round-robin
    (worker 0, 1, ..., W-1, 0, ...), skipping workers that are exhausted; this
    replays that order for workers that emit ``counts[w]`` batches.
    """
    taken = [0] * len(counts)
    remaining = min(batches, sum(counts))
    while remaining:
        for w, count in enumerate(counts):
            if remaining and taken[w] < count:
                taken[w] += 1
                remaining -= 1
    return taken


# --------------------------------------------------------------------------- reading and skipping


class SkippedSampleWarning(UserWarning):
    """A sample or shard was skipped; emitted once per reason per worker and epoch."""


class SkipTally:
    """Skipped-sample counts by reason, warning once per reason with the shard and sample key."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._warned: set[str] = set()

    def skip(self, reason: str, *, shard: str, key: str | None, detail: str) -> None:
        assert reason in SKIP_REASONS, reason
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if reason not in self._warned:
            self._warned.add(reason)
            where = f"{shard}" + (f", sample {key!r}" if key else "")
            warnings.warn(
                f"skipping ({reason}) in {where}: {detail}. Further '{reason}' skips are counted, not warned.",
                SkippedSampleWarning,
                stacklevel=2,
            )

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


def _json_member(name: str) -> bool:
    return name.endswith(".json")


def iter_shard_payloads(shard: ShardRef, tally: SkipTally) -> Iterator[tuple[str, bytes]]:
    """Yield ``(key, json bytes)`` for each ``<key>.json`` member of one shard, streaming.

    A tar that cannot be opened, breaks off (truncated, garbage bytes) or holds
    fewer samples than its planned row count is counted once as
    ``unreadable_shard`` / ``corrupt_tar``; the samples before the damage are kept.
    Python's streaming tar reader ends silently at a damaged *header*, which
    is why the planned row count doubles as the truncation check.
    """
    from webdataset.tariterators import tar_file_iterator

    try:
        # a plain file: never webdataset's gopen, which runs a 'pipe:' name through the shell
        stream = open(shard.url[len("file:"):] if shard.url.startswith("file:") else shard.url, "rb")
    except OSError as exc:
        tally.skip("unreadable_shard", shard=shard.url, key=None, detail=f"{type(exc).__name__}: {exc}")
        return
    count, last_key = 0, None
    try:
        with stream:
            for member in tar_file_iterator(stream, select_files=_json_member):
                last_key = member["fname"][: -len(".json")]
                count += 1
                yield last_key, member["data"]
    except (tarfile.TarError, EOFError, OSError) as exc:
        after = f"after sample {last_key!r}" if last_key else "before the first sample"
        tally.skip("corrupt_tar", shard=shard.url, key=last_key, detail=f"{after}: {exc}")
        return
    if shard.rows is not None and count < shard.rows:
        tally.skip(
            "corrupt_tar",
            shard=shard.url,
            key=last_key,
            detail=f"ended after {count} of {shard.rows} planned samples (truncated?)",
        )


@dataclass
class ParsedRow:
    """A shard sample reduced to the vocabulary: its id and non-empty texts by canonical code."""

    key: str
    texts: dict[str, str]
    shard: str = ""


def parse_payload(
    key: str, payload: bytes, *, shard: str, vocabulary: frozenset[str], tally: SkipTally
) -> ParsedRow | None:
    """Decode one sample's JSON; ``None`` (and a counted skip) if it is bad.

    Texts in valid languages outside ``vocabulary`` are dropped silently (that is
    the language filter); an invalid code skips the whole sample.
    """
    try:
        obj = json.loads(payload)
        row_id, raw_texts = obj["id"], obj["texts"]
        if not isinstance(raw_texts, dict):
            raise TypeError(f"'texts' is a {type(raw_texts).__name__}, not an object")
    except (ValueError, KeyError, TypeError) as exc:
        tally.skip("bad_json", shard=shard, key=key, detail=f"{type(exc).__name__}: {exc}")
        return None
    texts: dict[str, str] = {}
    for code, text in raw_texts.items():
        try:
            lang = normalize_language(str(code))
        except LanguageCodeError as exc:
            tally.skip("unknown_language", shard=shard, key=key, detail=str(exc))
            return None
        if lang in vocabulary and isinstance(text, str) and text.strip():
            texts[lang] = text
    if len(texts) < 2:
        tally.skip(
            "no_usable_text",
            shard=shard,
            key=key,
            detail=f"usable texts in {sorted(texts) or 'no language'}; a row needs two languages of the vocabulary",
        )
        return None
    return ParsedRow(key=str(row_id), texts=texts, shard=shard)


# --------------------------------------------------------------------------- language selection


@dataclass
class SelectedRow:
    """A row after language selection: sentences and their language ids, in vocabulary order."""

    key: str
    lang_ids: list[int]
    texts: list[str]


def select_languages(
    available: Sequence[str], *, policy: str, k: int, pivot: str, rng: random.Random
) -> list[str] | None:
    """The languages of one row that go into the batch, sorted; ``None`` if the row cannot serve the policy.

    Args:
        available: the row's usable languages (sorted canonical codes, at least two).
        policy: ``all`` keeps every language (multi-way training: every language is an
            anchor, the row's other languages its positives); ``k`` samples ``k`` of them
            uniformly without replacement (all of them if the row has fewer); ``pivot_pair``
            keeps the pivot and one uniformly sampled other language (the En-X bilingual
            baseline), and needs the pivot.
    """
    if policy == "all":
        return list(available)
    if policy == "k":
        return sorted(rng.sample(list(available), k)) if len(available) > k else list(available)
    if policy == "pivot_pair":
        if pivot not in available:
            return None
        other = rng.choice([lang for lang in available if lang != pivot])
        return sorted([pivot, other])
    raise ValueError(f"unknown language policy {policy!r}")


# --------------------------------------------------------------------------- tokenisation and collation


def tokenize(tokenizer: Any, texts: Sequence[str], *, max_length: int, prefix: str = "") -> list[list[int]]:
    """Token ids of every text, unpadded, in one batched fast-tokenizer call.

    One call per batch is what makes the Rust tokenizer fast; padding is done by
    :func:`pad_sequences`, which is cheaper than asking the tokenizer for padded
    tensors (fewer Python ints cross the boundary).
    """
    if not texts:
        return []
    inputs = [prefix + text for text in texts] if prefix else list(texts)
    encoded = tokenizer(
        inputs,
        add_special_tokens=True,
        truncation=True,
        max_length=max_length,
        padding=False,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return encoded["input_ids"]


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad token id lists into ``(input_ids, attention_mask)``, both ``(N, T)`` long, T = longest."""
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))  # (N,)
    width = int(lengths.max()) if len(lengths) else 0
    flat = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum()))
    mask = np.arange(width)[None, :] < lengths[:, None]  # (N, T) bool
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)  # (N, T)
    ids[mask] = flat  # row-major fill: each row's tokens land left-aligned
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


def collate(
    rows: Sequence[SelectedRow],
    sequences: Sequence[Sequence[int]],
    *,
    languages: tuple[str, ...],
    pivot_lang_id: int,
    pad_id: int,
    skip_counts: dict[str, int] | None = None,
    origin: tuple[int, int] = (0, 0),
) -> Batch:
    """Build a :class:`Batch` from selected rows and their sentences' token ids (row-major, as in the rows).

    ``sequences`` has one entry per sentence of ``rows`` in order; sentence ``i``
    gets the batch-local index of its row and its language id.
    """
    per_row = np.fromiter((len(row.texts) for row in rows), dtype=np.int64, count=len(rows))  # (R,)
    if int(per_row.sum()) != len(sequences):
        raise ValueError(f"{len(sequences)} token sequences for {int(per_row.sum())} sentences")
    input_ids, attention_mask = pad_sequences(sequences, pad_id)  # (N, T), (N, T)
    row_ids = torch.from_numpy(np.repeat(np.arange(len(rows), dtype=np.int64), per_row))  # (N,)
    lang_ids = torch.tensor([lang for row in rows for lang in row.lang_ids], dtype=torch.long)  # (N,)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        row_ids=row_ids,
        lang_ids=lang_ids,
        languages=languages,
        pivot_lang_id=pivot_lang_id,
        row_keys=tuple(row.key for row in rows),
        skip_counts=dict(skip_counts or {}),
        origin=origin,
    )


def collate_rows(
    rows: Sequence[SelectedRow],
    tokenizer: Any,
    *,
    languages: tuple[str, ...],
    pivot_lang_id: int,
    max_length: int,
    prefix: str = "",
) -> Batch:
    """Tokenise (one call) and collate selected rows: the whole worker-side batch step."""
    texts = [text for row in rows for text in row.texts]
    sequences = tokenize(tokenizer, texts, max_length=max_length, prefix=prefix)
    return collate(rows, sequences, languages=languages, pivot_lang_id=pivot_lang_id, pad_id=tokenizer.pad_token_id)


# --------------------------------------------------------------------------- the stream


def _rng(seed: int, *parts: object) -> random.Random:
    """A ``Random`` seeded from a string: stable across processes (not affected by hash randomisation)."""
    return random.Random("/".join(map(str, (seed, *parts))))


def _take(rows: Iterator[SelectedRow], n: int) -> list[SelectedRow]:
    return list(itertools.islice(rows, n))


class MultiWayStream(IterableDataset):
    """Tokenised, collated :class:`Batch` objects from multi-way WebDataset shards, one rank's share.

    Use with ``DataLoader(stream, batch_size=None, num_workers=stream.num_workers)``:
    batching happens in the workers. Construct it in the main process *after*
    the process group exists (e.g. in ``LightningDataModule.setup``): the rank
    and world size are captured here.

    Args:
        shards: the split's shards (paths, :class:`ShardRef` or ``ShardInfo``). Finite mode
            needs row counts; missing ones are counted by scanning tar headers here, on every rank.
        tokenizer: a (fast) Hugging Face tokenizer with a pad token; pickled into spawned workers.
        config: batch size, language policy, tokenisation, shuffling, epoch length.
        languages: the language vocabulary when ``config.languages`` is not set (the manifest's).
        num_workers: the DataLoader's ``num_workers`` (the plan has one slot per worker).
        shuffle: permute shards per epoch and use the shuffle buffer (off for validation).
        rank, world_size: override the values read from ``alignment.distributed``.
    """

    def __init__(
        self,
        shards: Iterable[Any],
        tokenizer: Any,
        config: StreamConfig,
        *,
        languages: Sequence[str] | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        from alignment import distributed

        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.num_workers = num_workers
        self.shuffle = shuffle
        # Captured now, in the main process: spawned workers have no RANK and no process group.
        self.rank = distributed.get_rank() if rank is None else rank
        self.world_size = distributed.get_world_size() if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if num_workers < 0:
            raise ValueError(f"{flag('num_workers')} must be >= 0, got {num_workers}")
        self.languages = self._vocabulary(config, languages)
        self.pivot_lang_id = self.languages.index(config.pivot)
        self.pad_id = self._pad_id(tokenizer)
        refs = as_shard_refs(shards)
        if not refs:
            raise ValueError("no shards to read")
        self.shards = refs if config.resampled else with_row_counts(refs)
        self.epoch = 0
        self.start_batch = 0
        self._length: int | None = None
        len(self)  # plans epoch 0: refuses impossible setups now, before any worker starts

    @staticmethod
    def _vocabulary(config: StreamConfig, languages: Sequence[str] | None) -> tuple[str, ...]:
        if config.languages is not None:
            vocab = list(config.languages)
        elif languages is not None:
            vocab = sorted({_normalize_flag_language(code, "languages") for code in languages})
        else:
            raise ValueError(f"no language vocabulary: set {flag('languages')} or read shards through a manifest")
        if config.pivot not in vocab:
            raise ValueError(
                f"{flag('pivot')}={config.pivot} is not among the languages {vocab}: "
                f"change {flag('pivot')} or {flag('languages')}"
            )
        check_k(config, vocab)
        return tuple(vocab)

    @staticmethod
    def _pad_id(tokenizer: Any) -> int:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad token; set tokenizer.pad_token")
        if not getattr(tokenizer, "is_fast", False):
            warnings.warn(
                f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer: tokenisation will be the bottleneck",
                stacklevel=3,
            )
        return int(pad_id)

    # -- epochs and plans

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch the next iteration produces, starting at its batch ``start_batch`` (resume).

        Call in the main process before the DataLoader creates its iterator: the
        workers (non-persistent) receive a copy of this object at that moment.
        """
        if epoch < 0 or start_batch < 0:
            raise ValueError(f"epoch and start_batch must be >= 0, got {epoch}, {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The finite-mode plan of ``epoch`` (default: the current one), identical on every rank."""
        if self.config.resampled:
            raise ValueError("a resampled stream has no shard plan")
        return plan_epoch(
            self.shards,
            world_size=self.world_size,
            num_workers=self.num_workers,
            batch_size=self.config.batch_size,
            seed=self.config.seed,
            epoch=self.epoch if epoch is None else epoch,
            shuffle=self.shuffle,
        )

    def __len__(self) -> int:
        """Batches this rank yields per epoch; the same on every rank and every epoch."""
        if self._length is None:
            if self.config.resampled:
                self._length = self.config.resampled_batches_per_rank(self.world_size)
            else:
                self._length = self.plan(0).batches_per_rank  # epoch-independent (see assign_shards)
        return self._length

    # -- iteration (runs in the workers)

    def _worker(self) -> int:
        info = get_worker_info()
        worker, seen = (0, 1) if info is None else (info.id, info.num_workers)
        if seen != max(1, self.num_workers):
            raise RuntimeError(
                f"the stream was planned for num_workers={self.num_workers} but the DataLoader runs "
                f"{0 if info is None else seen}: build both with the same {flag('num_workers')}"
            )
        return worker

    def __iter__(self) -> Iterator[Batch]:
        worker = self._worker()
        if get_worker_info() is not None:
            # A worker holds ~0.5M objects from the parent (fork) or from importing torch and transformers
            # (spawn); every full collection, triggered by the many lists a tokenizer call returns, walks them
            # all: tokenizer calls measured up to 2x slower. Freezing hides them from the collector (they live
            # as long as the worker anyway) and keeps fork's copy-on-write pages unwritten.
            gc.freeze()
        epoch, start = self.epoch, self.start_batch  # snapshot: set_epoch after iter() must not leak in
        if self.config.resampled:
            counts = split_evenly(len(self), max(1, self.num_workers))
            done = round_robin_taken(counts, start)[worker]
            # Resampled resume: reseeded by `start` below, so there is nothing to replay, only fewer batches.
            sizes: Sequence[int] = (self.config.batch_size,) * (counts[worker] - done)
            shards: Iterable[ShardRef] = self._resampled_shards(epoch, start, worker)
            skip = 0
        else:
            plan = self.plan(epoch)
            mine = plan.slots[self.rank][worker]
            shards, sizes = mine.shards, mine.batch_sizes
            skip = round_robin_taken(plan.worker_batch_counts(self.rank), start)[worker]
        # Finite mode replays the epoch from its start, so its random streams must not depend on `start`.
        seed_parts = (epoch, start) if self.config.resampled else (epoch,)
        return self._batches(shards, sizes, skip=skip, epoch=epoch, worker=worker, seed_parts=seed_parts)

    def _resampled_shards(self, epoch: int, start: int, worker: int) -> Iterator[ShardRef]:
        """Shards drawn with replacement, weighted by rows when known, seeded by (seed, epoch, start, rank, worker)."""
        rng = _rng(self.config.seed, "resampled", epoch, start, self.rank, worker)
        weights = [s.rows if s.rows is not None else 1 for s in self.shards]
        while True:
            yield rng.choices(self.shards, weights=weights)[0]

    def _rows(
        self, shards: Iterable[ShardRef], tally: SkipTally, rngs: dict[str, random.Random]
    ) -> Iterator[SelectedRow]:
        """Parsed, shuffled, language-selected rows of this worker's shards."""
        vocabulary = frozenset(self.languages)
        lang_index = {lang: i for i, lang in enumerate(self.languages)}
        parsed = self._parsed(shards, tally, vocabulary)
        if self.shuffle and self.config.shuffle_buffer > 1:
            from webdataset.filters import shuffle

            # Holds shuffle_buffer parsed rows in memory; filled fully before the first yield.
            buffer = self.config.shuffle_buffer
            parsed = shuffle(buffer, initial=buffer, rng=rngs["buffer"])(parsed)
        cfg = self.config
        for row in parsed:
            chosen = select_languages(
                sorted(row.texts), policy=cfg.language_policy, k=cfg.k, pivot=cfg.pivot, rng=rngs["select"]
            )
            if chosen is None:
                tally.skip("no_pivot", shard=row.shard, key=row.key, detail=f"no {cfg.pivot} text in the row")
                continue
            yield SelectedRow(row.key, [lang_index[lang] for lang in chosen], [row.texts[lang] for lang in chosen])

    def _parsed(self, shards: Iterable[ShardRef], tally: SkipTally, vocabulary: frozenset[str]) -> Iterator[ParsedRow]:
        empty_reads = 0
        for shard in shards:
            got = 0
            for key, payload in iter_shard_payloads(shard, tally):
                row = parse_payload(key, payload, shard=shard.url, vocabulary=vocabulary, tally=tally)
                if row is not None:
                    got += 1
                    yield row
            empty_reads = 0 if got else empty_reads + 1
            if self.config.resampled and empty_reads > 2 * len(self.shards):
                # Without this an all-corrupt shard set would spin forever drawing shards.
                raise RuntimeError(f"no usable rows in {empty_reads} consecutive shard reads of {len(self.shards)}")

    def _batches(
        self,
        shards: Iterable[ShardRef],
        sizes: Sequence[int],
        *,
        skip: int,
        epoch: int,
        worker: int,
        seed_parts: tuple[int, ...],
    ) -> Iterator[Batch]:
        """Emit exactly ``len(sizes) - skip`` batches (rows permitting, else smaller ones)."""
        cfg = self.config
        tally = SkipTally()
        rngs = {name: _rng(cfg.seed, name, *seed_parts, self.rank, worker) for name in ("buffer", "select", "order")}
        rows = self._rows(shards, tally, rngs)
        chunk_rows = cfg.bucket_buffer if cfg.bucketing else 1
        emitted = 0
        for chunk_sizes in _chunks(sizes, chunk_rows):
            chunk = _take(rows, sum(chunk_sizes))
            if emitted + len(chunk_sizes) == len(sizes) and not cfg.resampled:
                self._drain_unplanned(rows, tally)
            for batch_rows, sequences in self._cut(chunk, chunk_sizes, rngs["order"]):
                if emitted >= skip:
                    if sequences is None:
                        texts = [text for row in batch_rows for text in row.texts]
                        sequences = tokenize(self.tokenizer, texts, max_length=cfg.max_length, prefix=cfg.text_prefix)
                    yield collate(
                        batch_rows,
                        sequences,
                        languages=self.languages,
                        pivot_lang_id=self.pivot_lang_id,
                        pad_id=self.pad_id,
                        skip_counts=tally.snapshot(),
                        origin=(epoch, worker),
                    )
                emitted += 1

    def _cut(
        self, chunk: list[SelectedRow], sizes: Sequence[int], rng: random.Random
    ) -> list[tuple[list[SelectedRow], list[list[int]] | None]]:
        """Cut a chunk of rows into batches of the planned ``sizes`` (fewer rows: later batches shrink).

        Without bucketing a chunk is one batch and tokenising waits until it is
        needed (skipped batches on resume are never tokenised). With bucketing the
        chunk is tokenised in one call, rows are sorted by their longest sentence,
        cut in order, and the batch order is shuffled so lengths do not trend.
        """
        if not self.config.bucketing:
            return [(chunk, None)]
        cfg = self.config
        texts = [text for row in chunk for text in row.texts]
        sequences = tokenize(self.tokenizer, texts, max_length=cfg.max_length, prefix=cfg.text_prefix)
        per_row, start = [], 0
        for row in chunk:
            per_row.append(sequences[start : start + len(row.texts)])
            start += len(row.texts)
        order = sorted(range(len(chunk)), key=lambda i: max(map(len, per_row[i])))
        batches, cursor = [], 0
        for size in sizes:
            picked = order[cursor : cursor + size]
            cursor += len(picked)
            batches.append(([chunk[i] for i in picked], [seq for i in picked for seq in per_row[i]]))
        rng.shuffle(batches)
        return batches

    def _drain_unplanned(self, rows: Iterator[SelectedRow], tally: SkipTally) -> None:
        """Rows left after the plan's last chunk mean the row counts were stale: count and drop them."""
        for row in rows:
            tally.skip(
                "unplanned_rows",
                shard="(this worker's shards)",
                key=row.key,
                detail="more rows than the manifest's row counts; rebuild the manifest (align shards)",
            )


def _chunks(sizes: Sequence[int], chunk_rows: int) -> Iterator[list[int]]:
    """Group consecutive planned batch sizes into chunks of at least ``chunk_rows`` rows (the last may be less)."""
    chunk: list[int] = []
    for size in sizes:
        chunk.append(size)
        if sum(chunk) >= chunk_rows:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
