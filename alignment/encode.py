"""Length-grouped (padding-free) encoding of a step's sentences.

A multi-way batch is one ``(N, T)`` tensor padded to its longest sentence; with
short UI strings beside full sentences most of its token positions are padding
(``benchmarks/results/encode_padding-*``). Here the sentences are sorted by
real length and cut into chunks under a token budget (chunk rows x the chunk's
own longest sentence <= budget; a sentence longer than the budget is a chunk
of its own; the cut points trade padding against the number of forwards,
:func:`plan_chunks`), each chunk is cut to its own longest sentence and encoded, and
the embeddings are put back in batch order with one differentiable
``index_select``::

    (N, T) --sort by length--> chunks (n_c, L_c) --model--> (n_c, D) each
        --cat--> (N, D) in sorted order --index_select(inverse)--> (N, D) in batch order

The maths does not change with right padding (the common case): a sentence's
tokens keep their positions ``0..len-1`` and padding is masked out of attention
and pooling, so embeddings and gradients equal the single padded forward's to
float rounding (``tests/unit/test_encode.py``). With left padding, cutting pad
columns would shift the absolute positions BERT-style models give each token
(``position_ids = arange(T)``), so a left-padded (or otherwise non right-padded)
mask is encoded in one padded forward, as before.

Knows nothing of Lightning or ranks: ``model`` is any ``Batch -> (n, D)``
callable (a ``DualEncoder``, its frozen drift reference, a DDP wrapper). A model
with ``token_embeddings(input_ids)`` (``DualEncoder``) has the batch's word
embeddings looked up once and each chunk gets its slice as ``inputs_embeds``:
otherwise every chunk's backward would build the dense ``vocab x H`` gradient of
the embedding table again (for E5/XLM-R, 96M floats per chunk).

Cost per call: one device-to-host copy of the ``N`` lengths and a chunk plan
under a millisecond (at most ``max_length`` distinct lengths).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from alignment.batch import Batch


@dataclass
class PaddingStats:
    """Token positions the encoder processed in a step (accumulated over its forwards)."""

    real: Tensor | int = 0
    """Non-pad positions (a tensor when counting them would sync the device)."""
    processed: int = 0
    """Every position handed to the backbone (rows x width, summed over forwards)."""

    def add(self, real: Tensor | int, processed: int) -> None:
        self.real = self.real + real
        self.processed += processed

    def share(self) -> Tensor | float:
        """Padding share of the processed positions, ``1 - real / processed`` (0 when nothing ran)."""
        if not self.processed:
            return 0.0
        return 1.0 - self.real / self.processed


FORWARD_COST = 128
"""Token positions one more encoder forward is charged in the chunk plan (:func:`plan_chunks`): the trade of
padding against per-forward overhead. 128 keeps padding under 15% of the processed positions on the real
gettext multi-way batches at 16-64 rows with about 5-11 forwards per step
(``benchmarks/results/encode_padding-*``)."""


def plan_chunks(
    lengths: list[int], token_budget: int, forward_cost: int = FORWARD_COST
) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Order and chunks of sentences with ``lengths`` under ``token_budget``.

    Returns ``(order, chunks)``: ``order`` lists sentence indices from the
    longest to the shortest (stable among equal lengths); each chunk is
    ``(start, stop, width)``, a slice of ``order`` whose rows x ``width`` (its
    longest sentence) stays within the budget. A sentence longer than the
    budget is alone in its chunk.

    The cut points minimise processed positions (rows x width, summed) plus
    ``forward_cost`` per forward: a dynamic programme over the distinct lengths
    (at most ``max_length`` of them, so at most ``max_length**2 / 2`` steps),
    each segment of lengths cut into budget-sized chunks. Deterministic: the
    same lengths always give the same chunks (GradCache's re-encode relies on it).
    """
    if token_budget < 1:
        raise ValueError(f"--model.step.token_budget must be >= 1 to plan chunks, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    ordered = [max(int(lengths[i]), 1) for i in order]  # an empty mask still takes a column
    groups: list[list[int]] = []  # [start, stop, width] runs of equal length, longest first
    for index, width in enumerate(ordered):
        if groups and groups[-1][2] == width:
            groups[-1][1] = index + 1
        else:
            groups.append([index, index + 1, width])
    best, cut = [0] + [None] * len(groups), [0] * (len(groups) + 1)
    for j in range(1, len(groups) + 1):
        stop = groups[j - 1][1]
        for i in range(j - 1, -1, -1):  # segment groups[i:j] at the width of its longest, groups[i]
            start, _, width = groups[i]
            rows = max(token_budget // width, 1)
            cost = best[i] + (stop - start) * width + forward_cost * -(-(stop - start) // rows)
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    segments, j = [], len(groups)
    while j > 0:
        segments.append((groups[cut[j]][0], groups[j - 1][1], groups[cut[j]][2]))
        j = cut[j]
    chunks = []
    for start, stop, width in reversed(segments):
        rows = max(token_budget // width, 1)
        chunks += [(s, min(s + rows, stop), ordered[s]) for s in range(start, stop, rows)]
    return order, chunks


def right_padded(attention_mask: Tensor, lengths: Tensor) -> bool:
    """Whether every row's real tokens are exactly its first ``length`` positions."""
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return bool(torch.equal(attention_mask.bool(), columns.unsqueeze(0) < lengths.unsqueeze(1)))


def trim(batch: Batch, width: int) -> Batch:
    """``batch`` cut to its first ``width`` columns (right padding: only pad columns go)."""
    return replace(batch, input_ids=batch.input_ids[:, :width], attention_mask=batch.attention_mask[:, :width])


def take(batch: Batch, index: Tensor, width: int | None = None) -> Batch:
    """The sentences ``index`` of ``batch`` (rows, languages and row keys unchanged), cut to ``width`` columns."""
    ids, mask = batch.input_ids[index], batch.attention_mask[index]
    if width is not None:
        ids, mask = ids[:, :width], mask[:, :width]
    return replace(batch, input_ids=ids, attention_mask=mask, row_ids=batch.row_ids[index],
                   lang_ids=batch.lang_ids[index],
                   text_ids=None if batch.text_ids is None else batch.text_ids[index])  # fmt: skip


def length_order(batch: Batch) -> tuple[Tensor, list[int]] | None:
    """Sentence indices from the longest to the shortest and the sorted lengths, or None when the batch is not
    right-padded (left padding: grouping would shift absolute positions). One device-to-host copy of N ints."""
    lengths = batch.attention_mask.sum(dim=1)  # (N,)
    if not right_padded(batch.attention_mask, lengths):
        return None
    host = lengths.tolist()
    order = sorted(range(len(host)), key=lambda i: -host[i])
    return torch.tensor(order, dtype=torch.long, device=batch.input_ids.device), [host[i] for i in order]


def encode_grouped(
    model: Callable[[Batch], Tensor],
    batch: Batch,
    token_budget: int | None,
    stats: PaddingStats | None = None,
    forward_cost: int = FORWARD_COST,
) -> Tensor:
    """``(N, D)`` embeddings of ``batch`` in batch order, encoded in length-grouped chunks under ``token_budget``.

    ``token_budget`` None or 0 (or a left-padded batch) is the single padded
    forward ``model(batch)``. ``stats`` accumulates the processed and real token
    positions (for ``train/padding_share``).
    """
    n, width = batch.input_ids.shape
    if not token_budget or n == 0:
        if stats is not None:
            stats.add(batch.attention_mask.sum(), n * width)  # a device tensor: no sync here
        return model(batch)
    planned = length_order(batch)
    if planned is None:  # not right-padded: one padded forward keeps the positions
        if stats is not None:
            stats.add(batch.attention_mask.sum(), n * width)
        return model(batch)
    order, lengths = planned
    _, chunks = plan_chunks(lengths, token_budget, forward_cost)  # lengths are sorted already: the plan's order is the identity
    if len(chunks) == 1 and chunks[0][2] == width:
        if stats is not None:
            stats.add(sum(lengths), n * width)
        return model(batch)  # nothing to gain: one chunk of the full width
    lookup = getattr(model, "token_embeddings", None)
    embeds = lookup(batch.input_ids) if lookup is not None else None  # (N, T, H): one lookup, one table backward
    parts = []
    for start, stop, chunk_width in chunks:
        index = order[start:stop]
        chunk = take(batch, index, chunk_width)
        if embeds is None:
            parts.append(model(chunk))  # (n_c, D)
        else:
            parts.append(model(chunk, inputs_embeds=embeds[index, :chunk_width]))
        if stats is not None:
            stats.add(0, (stop - start) * chunk_width)
    if stats is not None:
        stats.add(sum(lengths), 0)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n, device=order.device)
    return torch.cat(parts).index_select(0, inverse)  # (N, D) in batch order; gradients flow back to each chunk
