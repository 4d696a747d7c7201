"""Multi-way contrastive losses computed from embeddings (no model, no collectives).

Every loss here takes sentence embeddings plus, per sentence, a *row id* (which
sentences translate one another) and a *language id*, and returns a dict of
named ``*_loss`` terms plus metrics; the training step sums the ``*_loss`` keys
(:func:`total_loss`) and logs the rest. Encoding lives in ``alignment.model``;
gathering candidates across ranks lives in ``alignment.distributed``, which
builds the :class:`GlobalCandidates` consumed here.

Notation
--------
The global batch (all ranks) holds ``M`` sentences ``s`` with row ``r(s)`` and
language ``l(s)``; this rank holds ``n`` of them, its *local anchors*. For an
anchor ``i`` and a candidate ``j`` the logit is::

    z_ij = (cos(e_i, e_j) - margin * [r(j) == r(i)]) / temperature

Temperature versus scale: ``scale = 1 / temperature``. LaBSE and
sentence-transformers speak of a *scale* (20 = temperature 0.05); CLIP/OpenCLIP
learn ``logit_scale = log(1 / temperature)``. Here the learnable parameter is
``log(temperature)``, clamped to ``[min_temperature, max_temperature]``.

The three objectives (``LossConfig.objective``)
------------------------------------------------
``multi_positive`` -- the multi-way method (Fazili & Goswami 2026). Every
sentence of the global batch is an anchor. Its candidates are all other
sentences of the global batch; its positives ``P(i)`` are the other
translations of its own row; every sentence of every other row is a negative.
One softmax per anchor, positives' probabilities *summed* (the MIL-NCE form,
Miech et al. 2020)::

    loss_i = -log( sum_{p in P(i)} exp z_ip  /  sum_{j != i} exp z_ij )

A translation of the anchor's own row is never a negative: it only appears in
the numerator and the denominator together, so raising its similarity never
raises the loss. The alternative, the SupCon "L_out" form (Khosla et al. 2020),
averages ``-log softmax_ip`` over the positives instead; it is not used here
because each translation then competes with the anchor's other translations
(it acts as a negative for them) and its minimum is ``log |P(i)|``, not 0.
Anchors without any positive (a row reduced to one sentence) contribute no term.
The loss is the mean over all anchor terms of the global batch.

``pairwise`` -- symmetric InfoNCE averaged over the language pairs present.
For each ordered pair ``(a, b)`` of languages, ``a != b``, the anchors are the
``a``-sentences whose row has a ``b``-sentence, the candidates are *only* the
``b``-sentences of the global batch, the positive is the anchor's own
``b``-translation::

    loss_i^{ab} = -log( exp z_ip / sum_{j : l(j) = b} exp z_ij )

averaged over the anchors of the pair, then over the pairs present (a pair is
present when it has at least one term). Both directions ``(a, b)`` and
``(b, a)`` are pairs, so this is the symmetric (bidirectional, LaBSE-style)
InfoNCE; ``bidirectional=False`` keeps only the direction from the lower to the
higher language id. Compared with ``multi_positive``, a sentence here never
competes with sentences of other languages than the target, so a model can
keep language-identity clusters; ``multi_positive`` removes that shortcut.

``en_x`` -- the English-centric bilingual baseline: ``pairwise`` restricted to
the pairs ``(pivot, X)`` and, when bidirectional, ``(X, pivot)``. Non-pivot
sentences never meet each other. This is what the multi-way method is compared
against (standard En-X bitext training, e.g. LaBSE).

Additive margin (LaBSE, Yang et al. 2019 / Feng et al. 2022): ``margin`` is
subtracted from every positive logit before the softmax (``m = 0.3`` typical),
forcing translations to beat non-translations by a margin. LaBSE sums its two
directions; we average them, which halves the loss and its gradient (a
learning-rate factor of 2 when porting LaBSE recipes).

Cross-device negatives and the gradient convention
--------------------------------------------------
Each rank scores only its ``n`` local anchors against all ``M`` global
candidates: memory ``O(n * M) = O(M^2 / world)`` per rank, like OpenCLIP's
``local_loss=True``, instead of the full ``M x M`` matrix on every rank
(measured: about 40-70 bytes per (anchor, candidate) pair for forward and
backward; at ``M = 16,384`` and world 8, 1.3 GiB per rank versus 10 GiB for
the full matrix -- ``benchmarks/results/loss_scaling-*.md``).
Every term carries a weight computed from the *global* metadata (row and
language ids of all ranks, which every rank has after the gather) such that the
weights of all terms of the global batch sum to one; the single-process global
loss is ``L = sum_terms w * loss_term``. The rank-local loss returned is::

    L_rank = world_size * sum_{local terms} w * loss_term

i.e. normalised by the global number of terms (per pair for ``pairwise``),
multiplied by the world size, because data-parallel training (DDP, DeepSpeed)
*averages* gradients over ranks: ``mean_rank grad(L_rank) = grad(L)`` exactly,
provided the gather's backward sums gradients across ranks
(``alignment.distributed.gather_candidates`` does). The mean of ``L_rank``
over ranks also equals ``L``, so logging the returned loss with a
rank-mean reduction (``sync_dist=True``) shows the global loss.

References
----------
- Fazili & Goswami (2026): multi-way contrastive alignment, every language an anchor.
- Feng et al. (2022), "Language-agnostic BERT Sentence Embedding" (LaBSE):
  additive margin softmax, bidirectional loss, cross-accelerator negatives.
- Gao et al. (2021), "Scaling Deep Contrastive Learning Batch Size under Memory
  Limited Setup" (GradCache): see ``alignment.gradcache``.
- OpenCLIP ``ClipLoss(local_loss=True, gather_with_grad=True)``: local anchors
  against gathered candidates, labels offset by rank.
- Oord et al. (2018), InfoNCE; Khosla et al. (2020), SupCon; Miech et al. (2020), MIL-NCE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignment.negatives import DuplicateMode, check_mode
from alignment.negatives import anchor_masks as _anchor_masks

Objective = Literal["multi_positive", "pairwise", "en_x"]
DriftKind = Literal["cosine", "mse"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
DRIFT_KINDS: tuple[str, ...] = get_args(DriftKind)


# --------------------------------------------------------------------------- config


@dataclass
class LossConfig:
    """The contrastive objective, its temperature and the drift regulariser."""

    objective: Objective = "multi_positive"
    """``multi_positive`` (the multi-way method), ``pairwise`` (symmetric InfoNCE
    averaged over language pairs) or ``en_x`` (English-centric baseline)."""
    temperature: float = 0.05
    """Softmax temperature (initial value when learned); scale = 1 / temperature."""
    learn_temperature: bool = False
    """Learn ``log(temperature)`` as a parameter, clamped to [min, max]."""
    min_temperature: float = 0.01
    """Lower clamp of a learned temperature (OpenCLIP clamps scale at 100)."""
    max_temperature: float = 1.0
    """Upper clamp of a learned temperature."""
    margin: float = 0.0
    """Additive margin subtracted from positive cosines (LaBSE: 0.3)."""
    bidirectional: bool = True
    """Score both directions of each language pair (``pairwise``, ``en_x``);
    ``multi_positive`` is always bidirectional (every sentence is an anchor)."""
    drift_weight: float = 0.0
    """Weight of the drift regulariser towards the frozen starting encoder; 0 disables."""
    drift_kind: DriftKind = "cosine"
    """Drift distance: ``cosine`` (1 - cos) or ``mse`` (squared L2, = 2 * cosine for unit vectors)."""
    mask_duplicates: DuplicateMode = "rows"
    """False negatives: ``rows`` masks every pair of two rows sharing a near-identical text, ``texts`` only the
    pairs of same texts, ``off`` nothing (``alignment.negatives``); logged as ``train/masked_negatives``."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--model.loss.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not self.min_temperature > 0:
            raise ValueError(f"--model.loss.min_temperature must be > 0, got {self.min_temperature}")
        if not self.max_temperature >= self.min_temperature:
            raise ValueError(
                f"--model.loss.max_temperature must be >= --model.loss.min_temperature ({self.min_temperature}), "
                f"got {self.max_temperature}"
            )
        if not self.min_temperature <= self.temperature <= self.max_temperature:
            raise ValueError(
                f"--model.loss.temperature must be between --model.loss.min_temperature and "
                f"--model.loss.max_temperature ({self.min_temperature}, {self.max_temperature}), got {self.temperature}"
            )
        if not 0.0 <= self.margin < 2.0:
            raise ValueError(f"--model.loss.margin must be in [0, 2) (a cosine margin), got {self.margin}")
        if self.objective == "multi_positive" and not self.bidirectional:
            raise ValueError(
                "--model.loss.bidirectional=false only applies to --model.loss.objective pairwise or en_x: with "
                "multi_positive every sentence is both an anchor and a candidate"
            )
        if self.drift_weight < 0:
            raise ValueError(f"--model.loss.drift_weight must be >= 0, got {self.drift_weight}")
        if self.drift_kind not in DRIFT_KINDS:
            raise ValueError(
                f"--model.loss.drift_kind must be one of {', '.join(DRIFT_KINDS)}, got {self.drift_kind!r}"
            )
        check_mode(self.mask_duplicates)


# --------------------------------------------------------------------------- candidates


@dataclass
class GlobalCandidates:
    """The gathered global batch every local anchor is scored against.

    Built by ``alignment.distributed.gather_candidates`` (any world size, one
    code path) or, for single-process use, :meth:`single`. Ranks' blocks are
    padded to the largest local batch, so ``M = world_size * max_local_n``.

    Attributes:
        emb: ``(M, D)`` gathered embeddings; padding rows hold arbitrary values.
        row_ids: ``(M,)`` long, *global* row ids (local row id + the number of
            rows on lower ranks); ``-1`` on padding.
        lang_ids: ``(M,)`` long, language ids (identical vocabulary on every
            rank); ``-1`` on padding.
        valid: ``(M,)`` bool, False on padding: padding is masked out of every
            softmax and metric and is never a positive.
        local_index: ``(n,)`` long, the column of each local sentence in ``M``
            (its own column is excluded from its candidates).
        num_rows: global number of rows (row ids lie in ``[0, num_rows)``).
        num_languages: one more than the largest language id in the global batch.
        num_sentences: global number of real (non-padding) sentences.
        world_size: ranks the batch was gathered from (the gradient-averaging factor).
        rank: this rank.
        text_ids: ``(M,)`` long text identities (``Batch.text_ids``), or ``None``.
    """

    emb: Tensor
    row_ids: Tensor
    lang_ids: Tensor
    valid: Tensor
    local_index: Tensor
    num_rows: int
    num_languages: int
    num_sentences: int
    world_size: int = 1
    rank: int = 0
    text_ids: Tensor | None = None

    @property
    def num_local(self) -> int:
        return int(self.local_index.shape[0])

    @classmethod
    def single(cls, emb: Tensor, row_ids: Tensor, lang_ids: Tensor) -> "GlobalCandidates":
        """Candidates of a single process: the local batch is the global batch.

        Costs two device-to-host syncs (row and language counts); in training use
        ``alignment.distributed.gather_candidates``, which also covers world size 1.
        """
        n = int(emb.shape[0])
        if emb.dim() != 2 or row_ids.shape != (n,) or lang_ids.shape != (n,):
            raise ValueError(
                f"expected embeddings (n, D) with row_ids and lang_ids (n,), got {tuple(emb.shape)}, "
                f"{tuple(row_ids.shape)}, {tuple(lang_ids.shape)}"
            )
        if n and (int(row_ids.min()) < 0 or int(lang_ids.min()) < 0):
            raise ValueError("row_ids and lang_ids must be >= 0 (-1 is reserved for padding)")
        counts = [(n, _count(row_ids), _count(lang_ids))]
        meta = torch.stack([row_ids, lang_ids], dim=-1).view(1, n, 2)  # (1, n, 2)
        return candidates_from_gathered(emb, meta, counts, rank=0)


def _count(ids: Tensor) -> int:
    """One more than the largest id, 0 when empty (a device-to-host sync)."""
    return int(ids.max()) + 1 if ids.numel() else 0


def candidates_from_gathered(
    emb: Tensor, meta: Tensor, counts: Sequence[tuple[int, int, int]], rank: int
) -> GlobalCandidates:
    """Assemble :class:`GlobalCandidates` from padded per-rank blocks.

    Args:
        emb: ``(W * max_n, D)`` rank blocks of embeddings, each padded to ``max_n``.
        meta: ``(W, max_n, 2)`` long, per block the local ``[row_id, lang_id]``, or ``(W, max_n, 3)`` with
            the text identity third.
        counts: per rank ``(n_r, num_rows_r, num_languages_r)``, host integers.
        rank: which block holds the local anchors.

    Row ids are made global by adding the number of rows of lower ranks (the
    rank offset of OpenCLIP's labels, here for rows of many sentences).
    """
    world, max_n = int(meta.shape[0]), int(meta.shape[1])
    if emb.shape[0] != world * max_n:
        raise ValueError(f"gathered embeddings have {emb.shape[0]} rows, expected {world} x {max_n}")
    device = meta.device
    sizes = torch.tensor([c[0] for c in counts], device=device)  # (W,)
    row_offsets = torch.tensor([sum(c[1] for c in counts[:r]) for r in range(world)], device=device)  # (W,)
    valid = torch.arange(max_n, device=device)[None, :] < sizes[:, None]  # (W, max_n)
    rows = torch.where(valid, meta[..., 0] + row_offsets[:, None], -1).reshape(-1)  # (M,)
    langs = torch.where(valid, meta[..., 1], -1).reshape(-1)  # (M,)
    local_index = rank * max_n + torch.arange(counts[rank][0], device=device)  # (n,)
    return GlobalCandidates(
        emb=emb,
        row_ids=rows,
        lang_ids=langs,
        valid=valid.reshape(-1),
        local_index=local_index,
        num_rows=sum(c[1] for c in counts),
        num_languages=max((c[2] for c in counts), default=0),
        num_sentences=sum(c[0] for c in counts),
        world_size=world,
        rank=rank,
        text_ids=meta[..., 2].reshape(-1) if meta.shape[-1] > 2 else None,
    )


# --------------------------------------------------------------------------- term weights


def _allowed_pairs(objective: str, num_langs: int, bidirectional: bool, pivot: int | None, device) -> Tensor:
    """``(L, G)`` bool: may an anchor of language ``a`` have a term in group ``g``?

    For ``multi_positive`` there is one group (all candidates), always allowed
    (``L = G = 1``: the anchor's language does not matter); for the pair
    objectives a group is a target language (``G = L``).
    """
    if objective == "multi_positive":
        return torch.ones(1, 1, dtype=torch.bool, device=device)
    a = torch.arange(num_langs, device=device)[:, None]  # (L, 1) anchor language
    b = torch.arange(num_langs, device=device)[None, :]  # (1, L) target language
    if objective == "pairwise":
        return (a < b) | ((a > b) & bidirectional)
    pivot_to_x = (a == pivot) & (b != pivot)
    return pivot_to_x | ((a != pivot) & (b == pivot) & bidirectional)


def term_weights(
    cands: GlobalCandidates, objective: str, *, bidirectional: bool = True, pivot_lang_id: int | None = None
) -> Tensor:
    """``(M, G)`` weight of the term (anchor ``s``, group ``g``) in the global loss.

    Uses only the gathered row and language ids, so every rank derives the same
    table without another collective. Weights are zero where no term exists
    (padding, disallowed pair, no positive in the group) and sum to one over
    the global batch (or are all zero when no term exists).

    ``multi_positive``: ``G = 1``, weight ``1 / #anchors with a positive``.
    ``pairwise`` / ``en_x``: ``G = #languages``, weight
    ``1 / (#pairs present * #terms of the anchor's pair)``.
    """
    rows, langs, valid = cands.row_ids, cands.lang_ids, cands.valid
    device = rows.device
    dtype = torch.promote_types(cands.emb.dtype, torch.float32)  # 1 / count is inexact in bf16
    num_langs = max(cands.num_languages, 1)
    groups, num_groups = _groups(cands, objective)
    # presence[row, g]: how many valid sentences the row has in group g.
    presence = torch.zeros(max(cands.num_rows, 1), num_groups, device=device, dtype=dtype)  # (R, G)
    presence.index_put_((rows[valid], groups[valid]), torch.ones((), device=device, dtype=dtype), accumulate=True)
    own = F.one_hot(groups, num_groups).to(presence.dtype)  # (M, G) the anchor itself
    positives = presence[rows.clamp(min=0)] - own  # (M, G) positives of s in group g
    allowed = _allowed_pairs(objective, num_langs, bidirectional, pivot_lang_id, device)  # (L, G)
    # multi_positive: every anchor indexes the single row of `allowed`.
    anchor_lang = langs.clamp(min=0) if objective != "multi_positive" else torch.zeros_like(langs)  # (M,)
    exists = (positives > 0) & valid[:, None] & allowed[anchor_lang]  # (M, G)
    if objective == "multi_positive":
        return exists / exists.sum().clamp(min=1).to(dtype)
    # per_pair[a, b]: number of terms of the ordered language pair (a, b).
    per_pair = torch.zeros(num_langs, num_groups, device=device, dtype=dtype).index_add_(
        0, anchor_lang, exists.to(presence.dtype)
    )  # (L, L)
    num_pairs = (per_pair > 0).sum().clamp(min=1)
    pair_weight = torch.where(per_pair > 0, 1.0 / (num_pairs * per_pair.clamp(min=1)), 0.0)  # (L, L)
    return exists * pair_weight[anchor_lang]  # (M, G)


def _groups(cands: GlobalCandidates, objective: str) -> tuple[Tensor, int]:
    """Candidate groups a softmax runs over: one group, or one per language."""
    if objective == "multi_positive":
        return torch.zeros_like(cands.lang_ids), 1
    return cands.lang_ids.clamp(min=0), max(cands.num_languages, 1)


# --------------------------------------------------------------------------- the maths


def grouped_logsumexp(logits: Tensor, mask: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """Log-sum-exp of each row of ``logits`` within each column group, over ``mask``.

    Args:
        logits: ``(n, M)``.
        mask: ``(n, M)`` bool, which entries take part.
        groups: ``(M,)`` long in ``[0, num_groups)``, the group of each column.

    Returns:
        ``(n, G)``; 0 (not ``-inf``) where a group is empty, so that selecting
        it away with a zero weight cannot leak a NaN into the gradient
        (``0 * inf``). Memory: two or three ``(n, M)`` temporaries, one kept
        for backward.
    """
    n, m = logits.shape
    if num_groups == 1:  # multi_positive: one fused logsumexp instead of scatters
        nonempty = mask.any(dim=1, keepdim=True)  # (n, 1)
        # An all-masked row would give exp(-inf - -inf) = NaN in backward: keep it finite.
        masked = logits.masked_fill(~(mask | ~nonempty), float("-inf"))  # (n, M)
        return torch.where(nonempty, masked.logsumexp(dim=1, keepdim=True), 0.0)  # (n, 1)
    index = groups.expand(n, m)  # (n, M) a view, no copy
    masked = logits.masked_fill(~mask, float("-inf"))  # (n, M)
    with torch.no_grad():  # the shift is gradient-neutral; per group so no group underflows
        shift = torch.full((n, num_groups), float("-inf"), device=logits.device, dtype=logits.dtype)
        shift = shift.scatter_reduce(1, index, masked, reduce="amax")  # (n, G)
        nonempty = torch.isfinite(shift)  # (n, G)
        shift = torch.where(nonempty, shift, torch.zeros_like(shift))
    exps = (masked - shift.gather(1, index)).exp()  # (n, M), 0 where masked
    sums = torch.zeros(n, num_groups, device=logits.device, dtype=logits.dtype).scatter_add(1, index, exps)  # (n, G)
    sums = torch.where(nonempty, sums, torch.ones_like(sums))  # log(1) = 0 on empty groups
    return sums.log() + shift


def multiway_infonce(
    anchor_emb: Tensor,
    cands: GlobalCandidates,
    *,
    objective: str = "multi_positive",
    temperature: Tensor | float = 0.05,
    margin: float = 0.0,
    bidirectional: bool = True,
    pivot_lang_id: int | None = None,
    mask_duplicates: str = "rows",
    metrics: bool = True,
) -> dict[str, Tensor]:
    """The contrastive maths of all three objectives (see the module docstring).

    Args:
        anchor_emb: ``(n, D)`` local anchors, the rank's own (un-gathered)
            embeddings, in the order of ``cands.local_index``. Usually unit
            norm; the similarity is the dot product either way.
        cands: the global batch (``alignment.distributed.gather_candidates``).
        objective: ``multi_positive``, ``pairwise`` or ``en_x``.
        temperature: a float or a 0-d tensor (learned); logits are ``sim / temperature``.
        margin: subtracted from positive similarities before scaling.
        bidirectional: both directions of each pair (pair objectives only).
        pivot_lang_id: the pivot language id, required for ``en_x``.
        mask_duplicates: which other-row candidates sharing a text are masked (``alignment.negatives``).
        metrics: also return the no-grad metrics (a few dozen small kernels: the training step asks for
            them on logging steps only).

    Returns:
        ``contrastive_loss`` (the rank-local loss, normalised as described in the
        module docstring) and, with ``metrics``, no-grad metrics ``retrieval_acc``, ``pos_cos``,
        ``neg_cos``, ``num_terms`` over the local anchors, ``masked_negatives``
        (world size x the local masked pairs: its mean over ranks is the global count).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective == "en_x" and pivot_lang_id is None:
        raise ValueError("objective 'en_x' needs pivot_lang_id (Batch.pivot_lang_id)")
    if anchor_emb.shape[0] != cands.num_local:
        raise ValueError(f"{anchor_emb.shape[0]} anchors but the candidates hold {cands.num_local} local sentences")
    masks = _anchor_masks(cands, mask_duplicates)
    sim = anchor_emb @ cands.emb.T  # (n, M) the dominant cost: O(n * M * D)
    if margin:
        sim_m = torch.where(masks.positive, sim - margin, sim)  # (n, M)
    else:
        sim_m = sim
    logits = sim_m / temperature  # (n, M)
    groups, num_groups = _groups(cands, objective)
    lse_all = grouped_logsumexp(logits, masks.candidate, groups, num_groups)  # (n, G)
    lse_pos = grouped_logsumexp(logits, masks.positive, groups, num_groups)  # (n, G)
    weights = term_weights(cands, objective, bidirectional=bidirectional, pivot_lang_id=pivot_lang_id)
    local_w = weights[cands.local_index]  # (n, G)
    per_term = torch.where(local_w > 0, lse_all - lse_pos, torch.zeros_like(lse_all))  # (n, G)
    # The loss always depends on the gathered tensor, even with no local term:
    # a rank skipping the gather's backward would hang the others' collective.
    loss = cands.world_size * (local_w * per_term).sum()
    out = {"contrastive_loss": loss}
    if metrics:
        out.update(_metrics(sim.detach(), anchor_emb.detach(), cands, masks, local_w))
        out["masked_negatives"] = (cands.world_size * masks.masked).to(sim.dtype)
    return out


@torch.no_grad()
def _metrics(sim: Tensor, anchor_emb: Tensor, cands: GlobalCandidates, masks, local_w: Tensor):
    """Retrieval accuracy and mean cosines over the local anchors (no grad).

    ``retrieval_acc``: share of anchors whose most similar candidate *in another
    language* is one of their translations (anchors without a translation are
    skipped). ``pos_cos`` / ``neg_cos``: mean cosine of same-row / other-row
    pairs. ``nan`` when there is nothing to average (e.g. an empty local batch).
    """
    norms = anchor_emb.norm(dim=-1)[:, None] * cands.emb.detach().norm(dim=-1)[None, :]  # (n, M)
    cos = sim / norms.clamp(min=1e-12)  # (n, M)
    negative = masks.candidate & ~masks.positive
    same_lang = cands.lang_ids[None, :] == cands.lang_ids[cands.local_index][:, None]  # (n, M)
    cross = masks.candidate & ~same_lang  # (n, M)
    has_cross_pos = (masks.positive & cross).any(dim=1)  # (n,)
    best = sim.masked_fill(~cross, float("-inf")).argmax(dim=1)  # (n,)
    hit = masks.positive.gather(1, best[:, None]).squeeze(1)  # (n,)
    return {
        "retrieval_acc": _masked_mean(hit.float(), has_cross_pos),
        "pos_cos": _masked_mean(cos, masks.positive),
        "neg_cos": _masked_mean(cos, negative),
        "num_terms": (local_w > 0).sum().to(sim.dtype),
    }


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum()


# --------------------------------------------------------------------------- module


class MultiWayContrastiveLoss(nn.Module):
    """The configured contrastive objective as a module that owns the temperature.

    ``forward(local_emb (n, D), candidates) -> dict``: ``contrastive_loss`` plus
    metrics (``retrieval_acc``, ``pos_cos``, ``neg_cos``, ``num_terms``,
    ``temperature``). With ``learn_temperature`` the module holds
    ``log_temperature`` (a parameter for the optimiser; no weight decay on it).

    Example::

        loss_fn = MultiWayContrastiveLoss(LossConfig(objective="pairwise", margin=0.3))
        emb = encoder(batch)                                           # (n, D)
        cands = distributed.gather_candidates(emb, batch.row_ids, batch.lang_ids)
        out = loss_fn(emb, cands, pivot_lang_id=batch.pivot_lang_id)
        total_loss(out).backward()
    """

    def __init__(self, config: LossConfig | None = None):
        super().__init__()
        self.config = config or LossConfig()
        log_t = torch.tensor(math.log(self.config.temperature))
        if self.config.learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t, persistent=False)
        self._log_bounds = (math.log(self.config.min_temperature), math.log(self.config.max_temperature))

    def temperature(self) -> Tensor:
        """The current temperature, a 0-d tensor (differentiable when learned)."""
        if self.config.learn_temperature:
            # Clamp the stored value (not only its use) so a parameter pushed past
            # a bound by the optimiser keeps a gradient that can bring it back.
            with torch.no_grad():
                self.log_temperature.clamp_(*self._log_bounds)
        return self.log_temperature.exp()

    def forward(self, local_emb: Tensor, candidates: GlobalCandidates, pivot_lang_id: int | None = None,
                metrics: bool = True):
        """Loss dict for the local anchors ``local_emb`` (n, D) against ``candidates`` (``metrics``: see
        :func:`multiway_infonce`)."""
        temperature = self.temperature()
        out = multiway_infonce(
            local_emb,
            candidates,
            objective=self.config.objective,
            temperature=temperature,
            margin=self.config.margin,
            bidirectional=self.config.bidirectional,
            pivot_lang_id=pivot_lang_id,
            mask_duplicates=self.config.mask_duplicates,
            metrics=metrics,
        )
        if metrics:
            out["temperature"] = temperature.detach()
        return out


# --------------------------------------------------------------------------- drift


def drift_loss(
    emb: Tensor,
    ref_emb: Tensor,
    weight: float,
    kind: str = "cosine",
    candidates: GlobalCandidates | None = None,
) -> dict[str, Tensor]:
    """Distance of the trained embeddings from those of the frozen starting encoder.

    Limits forgetting of the pretrained geometry (the paper's regulariser):
    ``ref_emb`` comes from ``DualEncoder.frozen_copy()`` on the same batch.

    Args:
        emb: ``(n, D)`` embeddings of the trained encoder.
        ref_emb: ``(n, D)`` embeddings of the frozen copy (no grad).
        weight: multiplier of the term.
        kind: ``cosine``: mean of ``1 - cos(e, e_ref)``; ``mse``: mean of the
            squared L2 distance ``||e - e_ref||^2`` (summed over ``D``), which
            is ``2 * (1 - cos)`` for unit vectors.
        candidates: the gathered batch, for the distributed normalisation: the
            mean is over the global number of sentences, times the world size
            (the same gradient convention as the contrastive losses).

    Returns:
        ``drift_loss`` (weighted, rank-local) and ``drift`` (unweighted local mean).
    """
    if kind not in DRIFT_KINDS:
        raise ValueError(f"drift kind must be one of {', '.join(DRIFT_KINDS)}, got {kind!r}")
    if emb.shape != ref_emb.shape:
        raise ValueError(f"drift: embeddings {tuple(emb.shape)} and reference {tuple(ref_emb.shape)} differ in shape")
    ref_emb = ref_emb.detach()
    if kind == "cosine":
        dist = 1.0 - F.cosine_similarity(emb, ref_emb, dim=-1)  # (n,)
    else:
        dist = (emb - ref_emb).pow(2).sum(dim=-1)  # (n,)
    world, total = (1, emb.shape[0]) if candidates is None else (candidates.world_size, candidates.num_sentences)
    loss = weight * world * dist.sum() / max(total, 1)
    return {"drift_loss": loss, "drift": dist.detach().mean() if dist.numel() else dist.detach().sum()}


def total_loss(terms: dict[str, Tensor]) -> Tensor:
    """Sum of the ``*_loss`` entries of a loss dict (adding a regulariser is adding a key)."""
    losses = [v for k, v in terms.items() if k.endswith("_loss")]
    if not losses:
        raise ValueError(f"no '*_loss' term in {sorted(terms)}")
    return torch.stack(losses).sum()
