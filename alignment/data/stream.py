"""Streaming training batches from WebDataset shards: :class:`MultiWayStream`, one rank's share.

The contract with the rest of the framework is :class:`~alignment.batch.Batch`: one flat
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
      -> one fast-tokenizer call per batch (or per bucket), or the ids of
         a pre-tokenised sidecar read in step with the shard, padding
      -> Batch

Where each step lives: :mod:`~alignment.data.plan` (the epoch plan),
:mod:`~alignment.data.samples` (tar members -> parsed rows, skip counting),
:mod:`~alignment.data.collate` (language selection, tokenising, collation),
:mod:`~alignment.data.config` (:class:`~alignment.data.config.StreamConfig`);
this module wires them into an ``IterableDataset``.

Equal batch counts on every rank (finite mode). A rank that yields fewer
batches than the others hangs or aborts the next collective (gloo dies with
SIGABRT). :func:`~alignment.data.plan.plan_epoch` therefore plans the whole epoch from the per-shard
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

Skipped samples are counted by reason (:data:`~alignment.batch.SKIP_REASONS`) in each worker,
warned once per reason per worker and epoch with the shard and sample key, and
each Batch carries its worker's cumulative counts (``Batch.skip_counts``) so
the main process can aggregate them (see ``AlignmentDataModule.skip_counts``).
"""

from __future__ import annotations

import gc
import itertools
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from alignment.batch import Batch
from alignment.data.collate import SelectedRow, collate, row_sequences, select_languages
from alignment.data.config import StreamConfig, check_k, flag
from alignment.data.hard_negatives import hard_negative_rows, read_sidecar
from alignment.data.identity import prepare_identity
from alignment.data.plan import (
    EpochPlan,
    ShardRef,
    as_shard_refs,
    plan_epoch,
    round_robin_taken,
    split_evenly,
    with_row_counts,
)
from alignment.data.samples import ParsedRow, SkipTally, iter_shard_payloads, parse_payload, with_token_ids
from alignment.data.teacher import read_teacher_sidecar, stored_vector
from alignment.languages import parse_languages


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
        prepare_identity()  # built here, forked workers inherit it (every batch hashes its texts)
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
            vocab = sorted(parse_languages(languages, flag("languages")) or ())
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
            ids = [row.ids[lang] for lang in chosen] if row.ids is not None else None
            identities = [row.text_ids[lang] for lang in chosen] if row.text_ids is not None else None
            yield SelectedRow(row.key, [lang_index[lang] for lang in chosen], [row.texts[lang] for lang in chosen], ids,
                              row.negatives, row.teacher, identities)

    def _parsed(self, shards: Iterable[ShardRef], tally: SkipTally, vocabulary: frozenset[str]) -> Iterator[ParsedRow]:
        empty_reads = 0
        for shard in shards:
            got = 0
            mined = read_sidecar(shard.negatives) if shard.negatives and self.config.hard_negatives else {}
            stored = read_teacher_sidecar(shard.teacher) if shard.teacher else None
            for key, payload, ids in with_token_ids(shard, iter_shard_payloads(shard, tally)):
                row = parse_payload(key, payload, shard=shard.url, vocabulary=vocabulary, tally=tally, token_ids=ids)
                if row is not None:
                    row.negatives = mined.get(key)
                    if stored is not None:
                        row.teacher = stored_vector(stored, key, shard)
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
                    batch_rows, sequences = self._with_negatives(batch_rows, sequences)
                    if sequences is None:
                        sequences = self._sequences(batch_rows)
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
        sequences = self._sequences(chunk)
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

    def _with_negatives(self, rows: list[SelectedRow], sequences: list[list[int]] | None
                        ) -> tuple[list[SelectedRow], list[list[int]] | None]:
        """The batch's rows plus each row's first ``--data.hard_negatives`` mined negatives not already in it.

        A negative's languages are selected like a drawn row's, with an RNG seeded by the pair of row ids, so
        the batch is a function of its drawn rows alone: resume (which skips whole batches) stays exact."""
        extras = hard_negative_rows(rows, self.config, self.languages)
        if not extras:
            return rows, sequences
        return [*rows, *extras], (None if sequences is None else [*sequences, *self._sequences(extras)])

    def _sequences(self, rows: Sequence[SelectedRow]) -> list[list[int]]:
        """The rows' token ids: read from the shards' pre-tokenised sidecars where present, else tokenised."""
        return row_sequences(self.tokenizer, rows, max_length=self.config.max_length, prefix=self.config.text_prefix)

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
