"""Reading shard samples: tar members -> parsed rows, every skipped sample counted by reason.

The reasons are :data:`~alignment.batch.SKIP_REASONS`; each worker counts them
in a :class:`SkipTally`, warns once per reason, and attaches the counts to
every batch it builds (``Batch.skip_counts``).
"""

from __future__ import annotations

import json
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from alignment.batch import SKIP_REASONS
from alignment.data.plan import ShardRef
from alignment.data.tario import iter_json_samples
from alignment.languages import LanguageCodeError, normalize_language


class SkippedSampleWarning(UserWarning):
    """A sample or shard was skipped; emitted once per reason per worker and epoch."""


class TokenSidecarWarning(UserWarning):
    """A shard's pre-tokenised ids could not be used (missing, damaged, out of step); its rows are tokenised."""


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


def iter_shard_payloads(shard: ShardRef, tally: SkipTally) -> Iterator[tuple[str, bytes]]:
    """Yield ``(key, json bytes)`` for each ``<key>.json`` member of one shard, streaming.

    A tar that cannot be opened, breaks off (truncated, garbage bytes) or holds
    fewer samples than its planned row count is counted once as
    ``unreadable_shard`` / ``corrupt_tar``; the samples before the damage are kept.
    A tar cut exactly at a member boundary reads as a shorter archive (and a
    compressed one read by ``tarfile`` ends silently at a damaged header), which
    is why the planned row count doubles as the truncation check.
    """
    try:
        # a plain file: never webdataset's gopen, which runs a 'pipe:' name through the shell
        stream = open(shard.url[len("file:"):] if shard.url.startswith("file:") else shard.url, "rb", buffering=1 << 20)
    except OSError as exc:
        tally.skip("unreadable_shard", shard=shard.url, key=None, detail=f"{type(exc).__name__}: {exc}")
        return
    count, last_key = 0, None
    try:
        with stream:
            for last_key, data in iter_json_samples(stream, shard.url):
                count += 1
                yield last_key, data
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


StoredIds = tuple[dict[str, list[int]], dict[str, int] | None]
"""A sample's pre-tokenised ids and text identities (None: not stored), by language as its JSON spells them."""


def with_token_ids(
    shard: ShardRef, payloads: Iterator[tuple[str, bytes]]
) -> Iterator[tuple[str, bytes, StoredIds | None]]:
    """``(key, payload, stored)``: each sample with its pre-tokenised ids and text identities from
    ``shard.tokens`` (read in lockstep).

    ``stored`` is None without a sidecar; from the first problem on (a missing or
    damaged file, a sample key out of step) the rest of the shard has none, with one
    :class:`TokenSidecarWarning`: those rows are tokenised, the batches stay the same.
    """
    if shard.tokens is None:
        for key, payload in payloads:
            yield key, payload, None
        return
    from alignment.data.tokens import decode_sample, iter_sidecar

    side = iter_sidecar(shard.tokens)
    broken = False
    try:
        for key, payload in payloads:
            ids = None
            if not broken:
                try:
                    side_key, side_payload = next(side)
                    if side_key != key:
                        raise ValueError(f"its sample {side_key!r} stands where the text shard has {key!r}")
                    ids = decode_sample(side_payload)
                except StopIteration:
                    problem: object = f"it ends before sample {key!r}"
                    broken = True
                except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
                    problem, broken = exc, True
                if broken:
                    warnings.warn(
                        f"pre-tokenised ids {shard.tokens} of {shard.url} not used from sample {key!r} on: {problem}; "
                        "those rows are tokenised (run `align shards verify` on the build)",
                        TokenSidecarWarning,
                        stacklevel=2,
                    )
            yield key, payload, ids
    finally:
        side.close()


@dataclass
class ParsedRow:
    """A shard sample reduced to the vocabulary: its id and non-empty texts by canonical code, and their
    pre-tokenised ids when the shard has them."""

    key: str
    texts: dict[str, str]
    shard: str = ""
    ids: dict[str, list[int]] | None = None
    text_ids: dict[str, int] | None = None
    """Its texts' identities (``alignment.data.identity``) when the token sidecar stores them."""
    negatives: list[dict] | None = None
    """Its mined hard negatives (``id``, ``texts``, ``score``), when the shard has a negatives sidecar."""
    teacher: Any = None
    """Its stored teacher embedding ``(D,)`` of its pivot text, when the shard has a teacher sidecar."""


def parse_payload(
    key: str,
    payload: bytes,
    *,
    shard: str,
    vocabulary: frozenset[str],
    tally: SkipTally,
    token_ids: StoredIds | None = None,
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
    codes: dict[str, str] = {}
    for code, text in raw_texts.items():
        try:
            lang = normalize_language(str(code))
        except LanguageCodeError as exc:
            tally.skip("unknown_language", shard=shard, key=key, detail=str(exc))
            return None
        if lang in vocabulary and isinstance(text, str) and text.strip():
            texts[lang] = text
            codes[lang] = str(code)
    if len(texts) < 2:
        tally.skip(
            "no_usable_text",
            shard=shard,
            key=key,
            detail=f"usable texts in {sorted(texts) or 'no language'}; a row needs two languages of the vocabulary",
        )
        return None
    ids = identities = None
    if token_ids is not None and all(codes[lang] in token_ids[0] for lang in texts):
        ids = {lang: token_ids[0][codes[lang]] for lang in texts}
        stored = token_ids[1]
        if stored is not None and all(codes[lang] in stored for lang in texts):
            identities = {lang: stored[codes[lang]] for lang in texts}
    return ParsedRow(key=str(row_id), texts=texts, shard=shard, ids=ids, text_ids=identities)
