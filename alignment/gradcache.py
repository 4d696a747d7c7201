"""GradCache: contrastive batches larger than activation memory.

The contrastive loss couples every sentence of the global batch, so it cannot
be split into independent micro-batches; but it depends on the encoder only
through the ``(N, D)`` embeddings. GradCache (Gao et al. 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup") exploits this:

1. encode the batch in chunks of ``chunk_size`` sentences *without* gradients
   (no activations kept), recording the RNG state before each chunk;
2. compute the loss on the concatenated, detached embeddings (which require
   grad) and back-propagate to them: ``g = dL/dE`` (N, D) -- here the
   cross-device gather and its backward collective run on the cached
   embeddings, so they happen once per step, not once per chunk;
3. re-encode each chunk *with* gradients under its recorded RNG state (the
   dropout masks match step 1) and back-propagate ``g_chunk`` into the
   parameters: ``d/dθ sum_i <g_i, e_i(θ)>`` = ``dL/dθ``.

Peak activation memory is that of one chunk; the cost is one extra forward
per step (about +33% compute over forward + backward). Parameter gradients
equal the uncached computation's to float rounding (tested with dropout on).

Data-parallel use: pass ``no_sync`` (e.g. ``ddp_model.no_sync``) so that DDP
all-reduces gradients only during the last chunk's backward. Parameters used
only inside the loss (a learnable temperature, the language discriminator of
``alignment.objectives``) get their gradient in step 2,
outside any DDP backward: GradCache averages them across ranks itself
(``alignment.distributed.average_gradients_``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from alignment import distributed
from alignment.batch import Batch
from alignment.encode import length_order, take, trim
from alignment.losses import total_loss


@dataclass
class GradCacheConfig:
    """Chunked encoding with cached embedding gradients."""

    chunk_size: int = 0
    """Sentences encoded per chunk; 0 disables GradCache (one forward with gradients).
    Peak activation memory scales with the chunk, not the batch."""

    def __post_init__(self) -> None:
        if self.chunk_size < 0:
            raise ValueError(f"--model.gradcache.chunk_size must be >= 0 (0 disables), got {self.chunk_size}")

    @property
    def enabled(self) -> bool:
        return self.chunk_size > 0


def split_batch(batch: Batch, chunk_size: int) -> list[Batch]:
    """Consecutive sentence chunks of ``batch`` (views, no copies); an empty
    batch gives one empty chunk, so the encoder still runs on every rank.

    Rows may straddle chunks: chunks only feed the encoder, the loss always
    sees the whole batch. Row ids, ``languages`` and ``row_keys`` are kept as
    in the batch (row ids stay batch-local, so chunk ids stay meaningful).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if batch.num_sentences == 0:  # an empty rank still runs one (empty) forward and backward
        return [batch]
    return [
        replace(
            batch,
            input_ids=batch.input_ids[start : start + chunk_size],
            attention_mask=batch.attention_mask[start : start + chunk_size],
            row_ids=batch.row_ids[start : start + chunk_size],
            lang_ids=batch.lang_ids[start : start + chunk_size],
        )
        for start in range(0, batch.num_sentences, chunk_size)
    ]


def graph_leaves(output: Tensor) -> list[Tensor]:
    """Leaf tensors requiring grad that ``output`` depends on, in a stable order.

    Walks the autograd graph (``grad_fn.next_functions``) to its
    ``AccumulateGrad`` nodes; cheap for a loss graph (tens of nodes).
    """
    leaves, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # set on AccumulateGrad nodes only
        if variable is not None:
            leaves.append(variable)
        stack.extend(fn for fn, _ in node.next_functions)
    return leaves


@dataclass
class RngState:
    """CPU and (if used) CUDA generator states, as ``torch.utils.checkpoint`` keeps them."""

    cpu: Tensor
    cuda: Tensor | None
    device: torch.device

    @classmethod
    def capture(cls, device: torch.device) -> "RngState":
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Run the block under this state; the global RNG is left as it was."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class GradCache:
    """One GradCache training step: ``step(batch)`` leaves parameter gradients populated.

    Args:
        encoder: ``Batch -> (n, D)`` embeddings (a ``DualEncoder``, or its DDP
            wrapper so that DDP's hooks see every forward).
        loss_fn: ``(embeddings (N, D), batch) -> loss dict``; it gathers
            candidates (``distributed.gather_candidates``) and computes the
            ``*_loss`` terms, all of which are summed and back-propagated.
        chunk_size: sentences per chunk.
        no_sync: context manager factory suppressing gradient all-reduce
            (``DistributedDataParallel.no_sync``); used for all chunks but the last.
        token_budget: when set, chunks are length-grouped (:meth:`chunks`); the
            encoder may group each chunk further (``alignment.encode``).

    Parameters the loss itself uses (a learnable temperature) are found in the
    loss's autograd graph and their gradients averaged across ranks after the
    loss backward, as DDP would have done. Every rank must call ``step`` (the
    loss backward runs the gather's collective). Under DDP, ranks with
    different numbers of chunks need ``DistributedDataParallel(...,
    forward_sync_buffers=False)`` (``broadcast_buffers=False`` before torch
    2.13): each DDP forward otherwise broadcasts buffers, a collective.
    """

    def __init__(
        self,
        encoder: Callable[[Batch], Tensor],
        loss_fn: Callable[[Tensor, Batch], dict[str, Tensor]],
        chunk_size: int,
        *,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
        token_budget: int | None = None,
    ):
        if chunk_size < 1:
            raise ValueError(f"--model.gradcache.chunk_size must be >= 1 to build a GradCache, got {chunk_size}")
        self.encoder = encoder
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self.no_sync = no_sync
        self.token_budget = token_budget

    def chunks(self, batch: Batch) -> tuple[list[Batch], Tensor | None]:
        """The step's chunks and, when they are length-grouped, the inverse permutation back to batch order.

        With a token budget (and right padding) the sentences are sorted from the longest to the shortest
        before they are cut into ``chunk_size`` chunks, and each chunk is cut to its own longest sentence
        (``alignment.encode``); both passes see exactly these chunks, in this order."""
        planned = length_order(batch) if self.token_budget and batch.num_sentences else None
        if planned is None:
            return split_batch(batch, self.chunk_size), None
        order, lengths = planned
        chunks = [trim(chunk, max(lengths[start], 1))
                  for start, chunk in zip(range(0, len(lengths), self.chunk_size),
                                          split_batch(take(batch, order), self.chunk_size))]  # fmt: skip
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return chunks, inverse

    def step(self, batch: Batch) -> dict[str, Tensor]:
        """Encode, compute the loss, back-propagate; return the loss dict (detached)."""
        chunks, inverse = self.chunks(batch)
        cached, states = self._encode_without_grad(chunks)  # (N, D) a leaf, in chunk order
        emb = cached if inverse is None else cached.index_select(0, inverse)  # batch order for the loss
        out = self.loss_fn(emb, batch)
        total = total_loss(out)
        loss_params = [p for p in graph_leaves(total) if p is not cached]  # e.g. log_temperature
        total.backward()  # dL/dE into cached.grad (chunk order); collectives of the gather run here
        distributed.average_gradients_(loss_params)
        self._backward_chunks(chunks, states, cached.grad)
        return {k: v.detach() for k, v in out.items()}

    def _encode_without_grad(self, chunks: list[Batch]) -> tuple[Tensor, list[RngState]]:
        states, embs = [], []
        with torch.no_grad():
            for chunk in chunks:
                states.append(RngState.capture(chunk.input_ids.device))
                embs.append(self.encoder(chunk))  # (n_c, D)
        cached = torch.cat(embs).requires_grad_(True)  # (N, D) a leaf: the loss graph stops here
        return cached, states

    def _backward_chunks(self, chunks: list[Batch], states: list[RngState], grad: Tensor | None) -> None:
        offset = 0
        for i, (chunk, state) in enumerate(zip(chunks, states)):
            n = chunk.num_sentences
            last = i == len(chunks) - 1
            sync = contextlib.nullcontext() if (last or self.no_sync is None) else self.no_sync()
            with sync, state.restored():
                emb = self.encoder(chunk)  # (n_c, D), same dropout masks as the cached pass
                # grad is None only if the loss ignored the embeddings; the backward still
                # runs so that DDP's all-reduce happens on every rank.
                chunk_grad = torch.zeros_like(emb) if grad is None else grad[offset : offset + n]
                # This chunk's activations are freed by its backward, before the next chunk.
                torch.autograd.backward(emb, grad_tensors=chunk_grad)
            offset += n
