"""The only module that imports ``torch.distributed``.

Owns collectives (gather with gradients), rank/world detection and launcher
environment detection. World size 1 takes the same code path as N: the
collectives become identities, everything around them is shared.

Cross-device negatives
----------------------
:func:`gather_candidates` gathers every rank's embeddings *with gradients*,
plus row ids and language ids, into :class:`~alignment.losses.GlobalCandidates`
(row ids made global by the number of rows on lower ranks). Each rank then
scores its own anchors against all candidates (``alignment.losses``).

The gradient convention, precisely. Rank ``r`` returns
``L_r = world * sum_{terms of r's anchors} w * loss_term`` where the weights
``w`` of all terms of the global batch sum to one (``losses.term_weights``).
The gather's backward *sums* the gradient every rank's loss sends to each
rank's embeddings (a reduce-scatter), so rank ``r``'s embeddings receive
``d(sum_s L_s) / d e_r``. DDP/DeepSpeed then *average* parameter gradients over
ranks: ``(1/world) * d(sum_s L_s)/d theta = d L / d theta`` with
``L = sum_all_terms w * loss_term``, the loss one process would compute over
the concatenated global batch. ``tests/distributed/test_gather_grads.py``
proves this with real gloo process groups of 2 and 4 ranks.

Two failure modes this module avoids (measured, see shared/docs):
- A plain ``dist.all_gather`` with the local tensor put back in its slot keeps
  only the local loss's gradient: scaled by ``1/world`` after DDP's averaging,
  and missing every other rank's negatives term.
- Ranks with unequal batch sizes abort gloo with SIGABRT (``Received data size
  doesn't match expected size``), not a Python exception. Here each rank first
  gathers a small fixed-size vector of its sizes, then pads to the largest
  local batch; the padding is masked out of every softmax and metric and is
  never a positive. Inconsistent widths or dtypes raise the same ``ValueError``
  on every rank (they all see the same gathered sizes), so nothing hangs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from alignment.losses import GlobalCandidates, candidates_from_gathered

# all_gather_into_tensor / reduce_scatter_tensor are deprecated in torch 2.13 in
# favour of the *_single names, which older torch (the GPU image) lacks.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Layout of the per-rank size vector gathered before the embeddings.
_N, _WIDTH, _DTYPE, _ROWS, _LANGS, _MIN_ID, _TEXTS = range(7)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def _world_and_rank(group) -> tuple[int, int]:
    """The process group actually in use; 1 and 0 when none is initialised.

    Unlike :func:`get_world_size` this ignores ``WORLD_SIZE`` in the
    environment: collectives need a live group, not a launcher's intent.
    """
    if not is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


# --------------------------------------------------------------------------- collectives


def all_gather_fixed(tensor: Tensor, group=None) -> Tensor:
    """Stack ``tensor`` from every rank: ``(world, *tensor.shape)``, no gradient.

    Every rank must pass the same shape and dtype (gloo aborts the process
    otherwise); identity (with a leading 1) at world size 1.
    """
    world, _ = _world_and_rank(group)
    tensor = tensor.detach().contiguous()
    if world == 1:
        return tensor.unsqueeze(0)
    flat = tensor.reshape(-1)  # gloo wants the concatenated form of the output
    out = flat.new_empty(world * flat.numel())
    _ALL_GATHER(out, flat, group=group)
    return out.view(world, *tensor.shape)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward reduce-scatters (sums) the gradient.

    Forward: ``(n, D)`` on every rank -> ``(world * n, D)`` on every rank.
    Backward: each rank's gradient w.r.t. the gathered tensor comes from its
    own loss; the gradient of the *sum* of all ranks' losses w.r.t. rank
    ``r``'s block is the sum over ranks of block ``r`` of their gradients,
    which a reduce-scatter (SUM) delivers to rank ``r``. Every rank must reach
    the backward (a rank that skips it leaves the others waiting).
    """

    @staticmethod
    def forward(ctx, x: Tensor, group, world: int) -> Tensor:
        ctx.group, ctx.world = group, world
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))  # (world * n, D)
        _ALL_GATHER(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()  # (world * n, D)
        local = grad.new_empty((grad.shape[0] // ctx.world, *grad.shape[1:]))  # (n, D)
        _REDUCE_SCATTER(local, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return local, None, None


def all_gather_with_grad(tensor: Tensor, group=None) -> Tensor:
    """Concatenate equally sized ``(n, D)`` tensors of all ranks, ``(world * n, D)``,
    with the summing backward of :class:`_AllGatherWithGrad`. Identity at world 1."""
    world, _ = _world_and_rank(group)
    if world == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, group, world)


def average_gradients_(params: Iterable[torch.nn.Parameter], group=None) -> None:
    """All-reduce-average ``.grad`` of ``params`` in place, as DDP does.

    For parameters whose gradient is produced outside the data-parallel
    wrapper's backward (GradCache's learnable temperature). One flat buffer,
    one collective; a missing gradient counts as zeros. Every rank must pass
    the same parameters in the same order. Averaging is idempotent once
    gradients agree, so a second averaging by DDP does no harm.
    """
    params = [p for p in params if p.requires_grad]
    world, _ = _world_and_rank(group)
    if world == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    # One buffer, one collective instead of len(params); cat promotes mixed dtypes.
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= world
    offset = 0
    for p in params:
        averaged = flat[offset : offset + p.numel()].view_as(p)
        if p.grad is None:
            p.grad = averaged.to(p.dtype).clone()
        else:
            p.grad.copy_(averaged)  # in place: keeps DDP bucket views and the dtype
        offset += p.numel()


def sum_and_mean(
    sums: dict[str, Tensor | float], means: dict[str, Tensor | float], *, device=None, group=None
) -> tuple[dict[str, float], dict[str, float]]:
    """Sum ``sums`` and average ``means`` over ranks in **one** all-reduce; values come back as floats.

    For the handful of per-step scalars (loss, flags, counters): one float64
    vector, one collective, one device-to-host sync to read it, instead of one
    of each per value. Tensors must be 1-element (they stay on ``device``
    until the collective: no sync before it). Every rank must pass the same
    keys in the same order. World size 1: the same arithmetic, no collective.
    """
    world, _ = _world_and_rank(group)
    keys = [("sum", k) for k in sums] + [("mean", k) for k in means]
    values = [*sums.values(), *means.values()]
    tensors = [i for i, v in enumerate(values) if torch.is_tensor(v)]
    floats = [i for i, v in enumerate(values) if not torch.is_tensor(v)]
    parts = []
    if tensors:
        parts.append(torch.cat([values[i].detach().reshape(1).to(device, torch.float64) for i in tensors]))
    if floats:
        parts.append(torch.tensor([float(values[i]) for i in floats], dtype=torch.float64, device=device))
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    host = flat.tolist()  # the one host sync
    by_index = dict(zip(tensors + floats, host))
    out_sums, out_means = {}, {}
    for i, (kind, key) in enumerate(keys):
        if kind == "sum":
            out_sums[key] = by_index[i]
        else:
            out_means[key] = by_index[i] / world
    return out_sums, out_means


# --------------------------------------------------------------------------- candidates


def _local_sizes(emb: Tensor, row_ids: Tensor, lang_ids: Tensor, has_texts: bool = False) -> Tensor:
    """``(7,)`` long on ``emb``'s device: n, width, dtype code, rows, languages, min id, text ids given.

    Built on the device without a host sync (the sync comes once, after the gather).
    """
    dtype_code = _DTYPES.index(emb.dtype) if emb.dtype in _DTYPES else -1
    fixed = torch.tensor([emb.shape[0], emb.shape[1], dtype_code], device=emb.device)
    texts = torch.tensor([int(has_texts)], device=emb.device)
    minus_one = row_ids.new_full((1,), -1)
    rows = torch.cat([row_ids, minus_one]).max() + 1
    langs = torch.cat([lang_ids, minus_one]).max() + 1
    min_id = torch.cat([row_ids, lang_ids, row_ids.new_zeros(1)]).min()
    return torch.cat([fixed, torch.stack([rows, langs, min_id]).to(fixed.dtype), texts])


def _check_local(emb: Tensor, row_ids: Tensor, lang_ids: Tensor, text_ids: Tensor | None = None) -> None:
    if emb.dim() != 2:
        raise ValueError(f"gather_candidates: embeddings must be (n, D), got shape {tuple(emb.shape)}")
    n = emb.shape[0]
    if row_ids.shape != (n,) or lang_ids.shape != (n,):
        raise ValueError(
            f"gather_candidates: {n} embeddings but row_ids {tuple(row_ids.shape)} and "
            f"lang_ids {tuple(lang_ids.shape)}; expected ({n},) each"
        )
    if row_ids.dtype != torch.long or lang_ids.dtype != torch.long:
        raise ValueError(
            f"gather_candidates: row_ids and lang_ids must be int64, got {row_ids.dtype}, {lang_ids.dtype}"
        )
    if text_ids is not None and (text_ids.shape != (n,) or text_ids.dtype != torch.long):
        raise ValueError(f"gather_candidates: text_ids must be ({n},) int64, got {tuple(text_ids.shape)} "
                         f"{text_ids.dtype}")


def _check_sizes(sizes: list[list[int]]) -> None:
    """Raise the same error on every rank (all see the same gathered sizes)."""
    ref = sizes[0]
    for r, s in enumerate(sizes):
        if s[_WIDTH] != ref[_WIDTH]:
            raise ValueError(
                f"gather_candidates: rank {r} has embedding width {s[_WIDTH]} but rank 0 has {ref[_WIDTH]}; "
                "every rank must run the same encoder"
            )
        if s[_DTYPE] != ref[_DTYPE] or s[_DTYPE] < 0:
            names = [str(_DTYPES[x[_DTYPE]]) if x[_DTYPE] >= 0 else "unsupported" for x in (s, ref)]
            raise ValueError(f"gather_candidates: rank {r} embeddings are {names[0]}, rank 0's are {names[1]}")
        if s[_MIN_ID] < 0:
            raise ValueError(
                f"gather_candidates: rank {r} has a negative row or language id (batch-local ids must be >= 0)"
            )
        if s[_TEXTS] != ref[_TEXTS]:
            raise ValueError(f"gather_candidates: rank {r} {'gives' if s[_TEXTS] else 'lacks'} text_ids and rank 0 "
                             "does not; every rank must build its batches the same way")


def gather_candidates(
    emb: Tensor, row_ids: Tensor, lang_ids: Tensor, *, text_ids: Tensor | None = None, group=None
) -> GlobalCandidates:
    """Gather embeddings (with gradients), row ids and language ids from all ranks.

    Args:
        emb: ``(n, D)`` local embeddings; ``n`` may differ between ranks.
        row_ids: ``(n,)`` long, batch-local row ids in ``[0, num_rows)``.
        lang_ids: ``(n,)`` long, language ids (same vocabulary on every rank).
        text_ids: ``(n,)`` long text identities (``Batch.text_ids``), gathered with
            the ids so the loss can mask duplicate texts (``alignment.negatives``);
            every rank must pass them or none.
        group: process group (default: the world).

    Returns:
        Candidates of ``M = world * max_n`` columns, each rank's block padded to
        the largest local batch ``max_n``; global row id = local row id + the
        rows of lower ranks. When every rank's batch is empty, ``M = 0`` and
        ``num_sentences == 0`` on every rank (the caller skips the step). Without an initialised process group this is the
        world-size-1 case of the same code.

    Costs: one tiny collective for the sizes (and one device-to-host sync to
    read them), one all-gather of ``(max_n, D)`` embeddings, one of the
    ``(max_n, 2)`` ids; in backward one reduce-scatter of ``(world * max_n, D)``.
    Every rank must call it, with the same embedding width and dtype.
    """
    _check_local(emb, row_ids, lang_ids, text_ids)
    world, rank = _world_and_rank(group)
    sizes = all_gather_fixed(_local_sizes(emb, row_ids, lang_ids, text_ids is not None), group).tolist()  # (W, 7)
    _check_sizes(sizes)
    max_n = max(s[_N] for s in sizes)
    counts = [(s[_N], s[_ROWS], s[_LANGS]) for s in sizes]
    if max_n == 0:  # every rank's batch is empty (all see the same sizes): no candidates, no more collectives
        return candidates_from_gathered(emb, row_ids.new_zeros((world, 0, 2)), counts, rank=rank)
    pad = max_n - emb.shape[0]
    padded = F.pad(emb, (0, 0, 0, pad))  # (max_n, D), zeros masked out downstream
    ids = [row_ids, lang_ids] if text_ids is None else [row_ids, lang_ids, text_ids]
    meta = F.pad(torch.stack(ids, dim=-1), (0, 0, 0, pad))  # (max_n, 2 or 3)
    gathered = all_gather_with_grad(padded, group)  # (W * max_n, D)
    metas = all_gather_fixed(meta, group)  # (W, max_n, 2 or 3)
    return candidates_from_gathered(gathered, metas, counts, rank=rank)


def launcher_slot(environ=None) -> tuple[int, int]:
    """``(rank, world size)`` of this process among independent workers, from the launcher's environment.

    For jobs that share work without collectives (``align translate``): torchrun's
    ``RANK``/``WORLD_SIZE``; a SLURM array task (``SLURM_ARRAY_TASK_ID`` from
    ``SLURM_ARRAY_TASK_MIN``, ``SLURM_ARRAY_TASK_COUNT`` tasks) times the tasks of its
    step (``SLURM_PROCID``/``SLURM_NTASKS``); ``srun`` tasks alone; else ``(0, 1)``.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    procid, ntasks = int(env.get("SLURM_PROCID", 0)), int(env.get("SLURM_NTASKS", 1))
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return index * ntasks + procid, int(env["SLURM_ARRAY_TASK_COUNT"]) * ntasks
    return procid, ntasks


def launcher_local_rank(environ=None) -> int:
    """This process's index on its node (torchrun ``LOCAL_RANK``, ``srun`` ``SLURM_LOCALID``), else 0: its GPU."""
    env = os.environ if environ is None else environ
    return int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
