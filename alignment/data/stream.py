"""Streaming training batches from WebDataset shards.

The contract with the rest of the framework is :class:`Batch`: one flat
``[N, T]`` token tensor holding every sentence of every row in the local batch,
plus, per sentence, the batch-local row index and the language index, so a loss
knows which embeddings translate one another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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
    """

    input_ids: Tensor
    attention_mask: Tensor
    row_ids: Tensor
    lang_ids: Tensor
    languages: tuple[str, ...]
    pivot_lang_id: int
    row_keys: tuple[str, ...]

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
        return Batch(
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            row_ids=move(self.row_ids),
            lang_ids=move(self.lang_ids),
            languages=self.languages,
            pivot_lang_id=self.pivot_lang_id,
            row_keys=self.row_keys,
        )

    def pin_memory(self) -> "Batch":
        """Called by ``DataLoader(pin_memory=True)``."""
        return Batch(
            input_ids=self.input_ids.pin_memory(),
            attention_mask=self.attention_mask.pin_memory(),
            row_ids=self.row_ids.pin_memory(),
            lang_ids=self.lang_ids.pin_memory(),
            languages=self.languages,
            pivot_lang_id=self.pivot_lang_id,
            row_keys=self.row_keys,
        )
