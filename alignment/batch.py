"""The :class:`Batch` a training step receives: flat ``[N, T]`` tokens plus, per sentence, its row and language.

A leaf module (torch, numpy and the standard library only), so the model, the losses,
gradient caching and the Lightning module depend on the batch layout and not on
the streaming pipeline that builds it (:mod:`alignment.data.stream`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from torch import Tensor

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
        text_ids: ``(N,)`` long, each sentence's text identity (a 64-bit hash of
            its normalised text, ``alignment.data.identity``): equal for
            identical or near-identical texts, which the loss keeps from being
            negatives of one another (``alignment.negatives``); ``None`` when
            the batch was built without them.
        texts: ``(N,)`` the sentences' texts in ``input_ids`` order (for a teacher with its own tokenizer,
            ``--model.distill.teacher``); empty when the builder did not keep them. Encoder chunks
            (``alignment.encode``, GradCache) keep the whole batch's tuple: read it on the whole batch only.
        teacher: ``(num_rows, D)`` float32, each row's stored teacher embedding of its pivot text
            (``align embed-teacher``, ``--model.distill.teacher_embeddings``); None when not read. Like
            ``texts``, encoder chunks keep the whole batch's tensor.
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
    text_ids: Tensor | None = None
    texts: tuple[str, ...] = ()
    teacher: Tensor | None = None

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

    def __reduce__(self):
        """Pickle CPU tensors by value (as numpy arrays), not through shared memory.

        A ``DataLoader`` worker hands each batch to the training process by
        pickling it; torch's own reducer moves every tensor through a new
        shared-memory segment, which costs about 0.5 ms per tensor (2.7 ms for a
        tiny model's batch of six tensors, measured), more than copying the few
        kilobytes to a megabyte a batch holds. Device tensors and dtypes numpy
        lacks (bfloat16) keep torch's reducer.
        """
        return _batch_from_wire, (tuple(_to_wire(getattr(self, f.name)) for f in fields(self)),)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(
            self,
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            row_ids=move(self.row_ids),
            lang_ids=move(self.lang_ids),
            text_ids=None if self.text_ids is None else move(self.text_ids),
            teacher=None if self.teacher is None else move(self.teacher),
        )

    def pin_memory(self) -> "Batch":
        """Called by ``DataLoader(pin_memory=True)``."""
        return replace(
            self,
            input_ids=self.input_ids.pin_memory(),
            attention_mask=self.attention_mask.pin_memory(),
            row_ids=self.row_ids.pin_memory(),
            lang_ids=self.lang_ids.pin_memory(),
            text_ids=None if self.text_ids is None else self.text_ids.pin_memory(),
            teacher=None if self.teacher is None else self.teacher.pin_memory(),
        )


def _to_wire(value):
    """A CPU tensor as its numpy array (pickled by value); anything else unchanged."""
    if isinstance(value, Tensor) and value.device.type == "cpu" and value.dtype != torch.bfloat16:
        return value.detach().numpy()
    return value


def _batch_from_wire(values: tuple) -> Batch:
    return Batch(*(torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in values))
