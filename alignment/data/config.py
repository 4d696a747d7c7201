"""What the stream does with the rows (:class:`StreamConfig`), and how its fields are named on the command line.

``DataConfig`` (in :mod:`alignment.data.datamodule`) extends :class:`StreamConfig`
with shard specs, workers and the tokenizer; :func:`flag` spells a field as
``align fit`` takes it, for error messages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from alignment.languages import LanguageCodeError, normalize_language, parse_languages

FLAG_PREFIX = "--data."
"""How the user spells this config's fields on the command line (``--data.batch_size``)."""

LanguagePolicy = Literal["all", "k", "pivot_pair"]
LANGUAGE_POLICIES: tuple[str, ...] = ("all", "k", "pivot_pair")


def flag(name: str) -> str:
    """A config field as the user types it: ``flag('batch_size') == '--data.batch_size'``."""
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
    :class:`~alignment.data.stream.MultiWayStream` needs.
    """

    batch_size: int = 32
    """Rows (not sentences) per batch on each rank. A row brings one sentence per selected language."""
    language_policy: LanguagePolicy = "all"
    """Which languages of a row go into the batch: `all` (multi-way: every language of the row), `k` (`k`
    languages sampled per row) or `pivot_pair` (the pivot plus one sampled language: the En-X baseline)."""
    k: int = 2
    """Languages sampled per row with `--data.language_policy k` (rows with fewer usable languages keep all)."""
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
    """Draw shards with replacement forever (for long runs); an epoch is then `--data.steps_per_epoch` batches."""
    samples_per_epoch: int | None = None
    """Resampled mode: rows per epoch summed over all ranks (rounded up to whole global batches)."""
    steps_per_epoch: int | None = None
    """Resampled mode: batches per epoch on each rank (alternative to `--data.samples_per_epoch`)."""
    bucketing: bool = False
    """Length bucketing: sort `--data.bucket_buffer` rows by token length, cut batches, shuffle their order."""
    bucket_buffer: int = 1024
    """Rows sorted together when `--data.bucketing` is on (at least `--data.batch_size`)."""
    hard_negatives: int = 0
    """Mined hard negatives per drawn row (0: off): each row's first K negatives stored by `align mine-negatives`
    join its batch as extra rows (deduplicated), so a batch holds up to batch_size x (1 + K) rows."""

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
        if self.hard_negatives < 0:
            raise ValueError(f"{flag('hard_negatives')} must be >= 0 (0 disables), got {self.hard_negatives}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"{flag('shuffle_buffer')} must be >= 0 rows, got {self.shuffle_buffer}")
        if self.bucketing and self.bucket_buffer < self.batch_size:
            raise ValueError(
                f"{flag('bucket_buffer')} must be >= {flag('batch_size')} ({self.batch_size}) "
                f"when {flag('bucketing')} is on, got {self.bucket_buffer}"
            )
        self._check_epoch_length()

    def _checked_languages(self, languages: Sequence[str] | str) -> list[str]:
        # `--data.languages en,de` or a YAML list, parsed as every other command parses language lists
        codes = sorted(parse_languages(languages, flag("languages")) or ())
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
