"""Loss maths against a direct, loop-based reference on small tensors.

The reference below spells every objective out sentence by sentence, with
Python loops and no masks, so it can be checked by reading. The vectorised
losses must match it in value and in gradient, including rows missing
languages, rows reduced to one sentence, the margin and the En-X selection.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from alignment.losses import (
    GlobalCandidates,
    LossConfig,
    MultiWayContrastiveLoss,
    candidates_from_gathered,
    drift_loss,
    multiway_infonce,
    term_weights,
    total_loss,
)

REPO = Path(__file__).resolve().parents[2]

# Rows as lists of language ids (0 = pivot): missing languages, a row without
# the pivot, and row 4 reduced to a single sentence (no positive at all).
ROWS = [[0, 1, 2, 3], [0, 1, 3], [0, 2], [1, 3], [0], [0, 1, 2, 3], [2, 3]]


def flat_batch(rows=ROWS, dim=8, seed=0, dtype=torch.float64):
    """Unit embeddings (N, D) with row and language ids, one sentence per (row, language)."""
    row_ids = torch.tensor([r for r, langs in enumerate(rows) for _ in langs])
    lang_ids = torch.tensor([lang for langs in rows for lang in langs])
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(len(row_ids), dim, generator=g, dtype=dtype), dim=-1)
    return emb, row_ids, lang_ids


def reference_loss(emb, rows, langs, objective, temperature, margin=0.0, bidirectional=True, pivot=0):
    """The global loss written out with loops (see alignment/losses.py docstring)."""
    rows, langs = rows.tolist(), langs.tolist()
    n = len(rows)

    def logit(i, j):
        shift = margin if rows[j] == rows[i] else 0.0
        return (emb[i] @ emb[j] - shift) / temperature

    def term(i, cands, positives):
        den = torch.logsumexp(torch.stack([logit(i, j) for j in cands]), 0)
        num = torch.logsumexp(torch.stack([logit(i, j) for j in positives]), 0)
        return den - num

    if objective == "multi_positive":
        terms = []
        for i in range(n):
            cands = [j for j in range(n) if j != i]
            positives = [j for j in cands if rows[j] == rows[i]]
            if positives:
                terms.append(term(i, cands, positives))
        return torch.stack(terms).mean()
    pair_means = []
    for a in sorted(set(langs)):
        for b in sorted(set(langs)):
            if a == b or (objective == "pairwise" and not bidirectional and a > b):
                continue
            if objective == "en_x" and not ((a == pivot) or (bidirectional and b == pivot)):
                continue
            terms = []
            for i in [i for i in range(n) if langs[i] == a]:
                cands = [j for j in range(n) if langs[j] == b]
                positives = [j for j in cands if rows[j] == rows[i]]
                if positives:
                    terms.append(term(i, cands, positives))
            if terms:
                pair_means.append(torch.stack(terms).mean())
    return torch.stack(pair_means).mean()


VARIANTS = [
    ("multi_positive", 0.0, True),
    ("multi_positive", 0.3, True),
    ("pairwise", 0.0, True),
    ("pairwise", 0.3, True),
    ("pairwise", 0.0, False),
    ("en_x", 0.0, True),
    ("en_x", 0.3, True),
    ("en_x", 0.0, False),
]


@pytest.mark.parametrize("objective,margin,bidirectional", VARIANTS)
def test_matches_loop_reference_value_and_gradient(objective, margin, bidirectional):
    emb, rows, langs = flat_batch()
    temperature = 0.1
    ours_in = emb.clone().requires_grad_(True)
    ours = multiway_infonce(
        ours_in,
        GlobalCandidates.single(ours_in, rows, langs),
        objective=objective,
        temperature=temperature,
        margin=margin,
        bidirectional=bidirectional,
        pivot_lang_id=0,
    )["contrastive_loss"]
    ref_in = emb.clone().requires_grad_(True)
    ref = reference_loss(ref_in, rows, langs, objective, temperature, margin, bidirectional, pivot=0)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, atol=1e-10, rtol=1e-10)


def test_objectives_differ_on_the_same_batch():
    """A guard against a reference that would pass with any objective."""
    emb, rows, langs = flat_batch()
    values = {
        obj: float(multiway_infonce(emb, GlobalCandidates.single(emb, rows, langs), objective=obj,
                                    pivot_lang_id=0)["contrastive_loss"])
        for obj in ("multi_positive", "pairwise", "en_x")
    }
    assert len({round(v, 6) for v in values.values()}) == 3, values


def aligned_batch(num_rows=4, num_langs=3):
    """Every translation of row r is the same basis vector e_r: perfectly aligned."""
    rows = torch.arange(num_rows).repeat_interleave(num_langs)
    langs = torch.arange(num_langs).repeat(num_rows)
    emb = torch.eye(num_rows, dtype=torch.float64)[rows]
    return emb, rows, langs


def test_same_row_translations_are_never_negatives():
    """Perfectly aligned rows give a loss near 0 with multi_positive.

    Had a translation of the anchor's own row counted as a negative, each of
    its two translations would compete with the other: loss >= log 2 ~ 0.69
    (one positive per softmax, or SupCon's L_out form).
    """
    emb, rows, langs = aligned_batch()
    out = multiway_infonce(emb, GlobalCandidates.single(emb, rows, langs), temperature=0.05)
    assert float(out["contrastive_loss"]) < 1e-6
    assert float(out["retrieval_acc"]) == 1.0
    assert float(out["pos_cos"]) == pytest.approx(1.0)
    assert float(out["neg_cos"]) == pytest.approx(0.0)


@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_translations_only_pull_and_other_rows_only_push(margin):
    """Sign of d loss / d logit for every (anchor, candidate) pair.

    With anchors = identity and candidate "embeddings" X, the logit of
    (i, j) is X[j, i] / t, so X.grad[j, i] is the gradient w.r.t. that logit.
    A translation (same row) must have a gradient <= 0 (raising its similarity
    never raises the loss: it is never a negative); another row's sentence >= 0.
    """
    emb, rows, langs = flat_batch()
    n = len(rows)
    x = (emb @ emb.T).T.clone().requires_grad_(True)  # (n, n) logits * t, transposed
    loss = multiway_infonce(torch.eye(n, dtype=x.dtype), GlobalCandidates.single(x, rows, langs),
                            temperature=0.1, margin=margin)["contrastive_loss"]
    (grad,) = torch.autograd.grad(loss, x)
    grad = grad.T  # (anchor i, candidate j)
    same = rows[:, None] == rows[None, :]
    off = ~torch.eye(n, dtype=torch.bool)
    assert (grad[same & off] <= 0).all()
    assert (grad[~same] >= 0).all()
    assert (grad[same & off] < 0).any() and (grad[~same] > 0).any()


def test_margin_raises_the_loss_and_matches_the_shifted_positive_logit():
    emb, rows, langs = aligned_batch(num_rows=3, num_langs=2)
    cands = GlobalCandidates.single(emb, rows, langs)
    t, m = 0.1, 0.3
    loss = multiway_infonce(emb, cands, temperature=t, margin=m)["contrastive_loss"]
    # Each anchor: one positive at cos 1 - m, four negatives at cos 0.
    expected = -math.log(math.exp((1 - m) / t) / (math.exp((1 - m) / t) + 4))
    assert float(loss) == pytest.approx(expected, rel=1e-9)
    assert float(loss) > float(multiway_infonce(emb, cands, temperature=t)["contrastive_loss"])


def test_en_x_uses_only_pivot_pairs():
    """Moving non-pivot sentences relative to each other leaves en_x unchanged.

    The pivots lie on axes 0 and 1. Moving a fr sentence's components on the
    other axes elsewhere (norm kept) changes its similarity to the de sentences
    but not to any pivot: only en_x must ignore that.
    """
    rows = torch.tensor([0, 0, 0, 1, 1, 1])
    langs = torch.tensor([0, 1, 2, 0, 1, 2])
    emb = torch.zeros(6, 6, dtype=torch.float64)
    emb[0, 0] = emb[3, 1] = 1.0  # pivots on axes 0, 1
    emb[1] = F.normalize(torch.tensor([0.8, 0.1, 0.5, 0.2, 0.0, 0.0], dtype=torch.float64), dim=0)
    emb[2] = F.normalize(torch.tensor([0.7, 0.2, 0.0, 0.0, 0.6, 0.1], dtype=torch.float64), dim=0)
    emb[4] = F.normalize(torch.tensor([0.1, 0.9, 0.3, 0.0, 0.0, 0.2], dtype=torch.float64), dim=0)
    emb[5] = F.normalize(torch.tensor([0.2, 0.7, 0.0, 0.5, 0.0, 0.0], dtype=torch.float64), dim=0)
    moved = emb.clone()
    moved[2, 2:4], moved[2, 4:6] = emb[2, 4:6], 0.0  # de-fr similarities change, pivot ones do not
    torch.testing.assert_close(moved @ emb[[0, 3]].T, emb @ emb[[0, 3]].T)
    for objective, should_change in [("en_x", False), ("pairwise", True), ("multi_positive", True)]:
        a = multiway_infonce(emb, GlobalCandidates.single(emb, rows, langs), objective=objective, pivot_lang_id=0)
        b = multiway_infonce(moved, GlobalCandidates.single(moved, rows, langs), objective=objective,
                             pivot_lang_id=0)
        changed = abs(float(a["contrastive_loss"]) - float(b["contrastive_loss"])) > 1e-9
        assert changed == should_change, objective


def test_en_x_equals_pairwise_with_two_languages():
    emb, rows, langs = flat_batch(rows=[[0, 1], [0, 1], [0, 1], [0]])
    cands = GlobalCandidates.single(emb, rows, langs)
    en_x = multiway_infonce(emb, cands, objective="en_x", pivot_lang_id=0)["contrastive_loss"]
    pairwise = multiway_infonce(emb, cands, objective="pairwise")["contrastive_loss"]
    torch.testing.assert_close(en_x, pairwise)


@pytest.mark.parametrize("objective", ["multi_positive", "pairwise", "en_x"])
def test_term_weights_sum_to_one(objective):
    emb, rows, langs = flat_batch()
    w = term_weights(GlobalCandidates.single(emb, rows, langs), objective, pivot_lang_id=0)
    assert float(w.sum()) == pytest.approx(1.0)
    assert (w[11] == 0).all()  # sentence 11 is row 4's only sentence: no term


def test_no_positive_anywhere_gives_zero_loss_and_finite_gradients():
    emb, rows, langs = flat_batch(rows=[[0], [1], [2]])
    emb.requires_grad_(True)
    out = multiway_infonce(emb, GlobalCandidates.single(emb, rows, langs), objective="pairwise")
    out["contrastive_loss"].backward()
    assert out["contrastive_loss"].item() == 0.0
    assert torch.isfinite(emb.grad).all() and float(emb.grad.abs().sum()) == 0.0


def split_into_ranks(emb, rows, langs, rank_rows):
    """Simulate the gather in one process: rank blocks padded to the largest one.

    ``rank_rows`` lists each rank's global rows; returns, per rank, the local
    anchor slice and the candidates that ``distributed.gather_candidates`` would
    build. Padding rows are filled with copies of real embeddings on purpose:
    masking must make their content irrelevant.
    """
    blocks, counts = [], []
    for row_set in rank_rows:
        idx = torch.cat([torch.nonzero(rows == r).flatten() for r in row_set])
        local_rows = torch.searchsorted(torch.tensor(row_set), rows[idx])  # renumber 0..k-1
        blocks.append((emb[idx], local_rows, langs[idx]))
        counts.append((len(idx), len(row_set), int(langs[idx].max()) + 1))
    max_n = max(c[0] for c in counts)
    padded, meta = [], []
    for e, r, lg in blocks:
        pad = max_n - e.shape[0]
        padded.append(torch.cat([e, emb[:pad]]))  # adversarial padding content
        meta.append(torch.stack([F.pad(r, (0, pad), value=0), F.pad(lg, (0, pad), value=0)], dim=-1))
    gathered = torch.cat(padded)  # (W * max_n, D)
    meta = torch.stack(meta)  # (W, max_n, 2)
    return [(blocks[r][0], candidates_from_gathered(gathered, meta, counts, rank=r)) for r in range(len(rank_rows))]


@pytest.mark.parametrize("objective", ["multi_positive", "pairwise", "en_x"])
def test_simulated_ranks_average_to_the_global_loss_and_gradient(objective):
    """Patched-collective tier: autograd through the concatenation sums the
    gradient over ranks exactly like the gather's backward, then / W like DDP."""
    emb, rows, langs = flat_batch()
    rank_rows = [[0, 1], [2, 3, 4], [5, 6]]  # unequal local sizes: 7, 5, 6 sentences
    order = torch.cat([torch.nonzero(rows == r).flatten() for rs in rank_rows for r in rs])
    emb, rows, langs = emb[order], rows[order], langs[order]
    leaf = emb.clone().requires_grad_(True)
    losses = []
    for anchors, cands in split_into_ranks(leaf, rows, langs, rank_rows):
        losses.append(multiway_infonce(anchors, cands, objective=objective, margin=0.2, pivot_lang_id=0))
    world = len(rank_rows)
    (sum(o["contrastive_loss"] for o in losses) / world).backward()
    ref_leaf = emb.clone().requires_grad_(True)
    ref = multiway_infonce(ref_leaf, GlobalCandidates.single(ref_leaf, rows, langs), objective=objective,
                           margin=0.2, pivot_lang_id=0)["contrastive_loss"]
    ref.backward()
    torch.testing.assert_close(sum(o["contrastive_loss"].item() for o in losses) / world, ref.item())
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, atol=1e-10, rtol=1e-10)


def test_padding_is_never_a_candidate_or_positive():
    emb, rows, langs = flat_batch()
    single = multiway_infonce(emb, GlobalCandidates.single(emb, rows, langs))
    n = emb.shape[0]
    padded = torch.cat([emb, emb[:5]])  # padding holds copies of real sentences
    meta = torch.stack([torch.cat([rows, rows[:5]]), torch.cat([langs, langs[:5]])], dim=-1)[None]
    cands = candidates_from_gathered(padded, meta, [(n, int(rows.max()) + 1, 4)], rank=0)
    assert cands.valid.sum() == n and (cands.row_ids[n:] == -1).all()
    out = multiway_infonce(emb, cands)
    for key in ("contrastive_loss", "retrieval_acc", "pos_cos", "neg_cos"):
        torch.testing.assert_close(out[key], single[key])


def test_metrics_against_direct_computation():
    emb, rows, langs = flat_batch(dtype=torch.float32)
    out = multiway_infonce(emb, GlobalCandidates.single(emb, rows, langs))
    sim = emb @ emb.T
    n = len(rows)
    same = rows[:, None] == rows[None, :]
    off = ~torch.eye(n, dtype=torch.bool)
    assert float(out["pos_cos"]) == pytest.approx(float(sim[same & off].mean()), abs=1e-6)
    assert float(out["neg_cos"]) == pytest.approx(float(sim[~same].mean()), abs=1e-6)
    hits, counted = 0, 0
    for i in range(n):
        other = [j for j in range(n) if langs[j] != langs[i]]
        if not any(rows[j] == rows[i] for j in other):
            continue
        counted += 1
        best = max(other, key=lambda j: float(sim[i, j]))
        hits += int(rows[best] == rows[i])
    assert float(out["retrieval_acc"]) == pytest.approx(hits / counted)


def test_learnable_temperature_gets_a_gradient_and_is_clamped():
    emb, rows, langs = flat_batch(dtype=torch.float32)
    loss_fn = MultiWayContrastiveLoss(LossConfig(learn_temperature=True, temperature=0.07, min_temperature=0.02))
    out = loss_fn(emb, GlobalCandidates.single(emb, rows, langs))
    out["contrastive_loss"].backward()
    assert loss_fn.log_temperature.grad is not None and loss_fn.log_temperature.grad != 0
    assert float(out["temperature"]) == pytest.approx(0.07)
    with torch.no_grad():
        loss_fn.log_temperature.fill_(math.log(0.001))  # an optimiser step past the bound
    assert float(loss_fn(emb, GlobalCandidates.single(emb, rows, langs))["temperature"]) == pytest.approx(0.02)
    assert loss_fn.log_temperature.item() == pytest.approx(math.log(0.02))


def test_fixed_temperature_has_no_parameters_and_scales_logits():
    emb, rows, langs = flat_batch()
    cands = GlobalCandidates.single(emb, rows, langs)
    fixed = MultiWayContrastiveLoss(LossConfig(temperature=0.1))
    assert list(fixed.parameters()) == []
    ref = reference_loss(emb, rows, langs, "multi_positive", 0.1)
    torch.testing.assert_close(fixed(emb.float(), GlobalCandidates.single(emb.float(), rows, langs))[
        "contrastive_loss"].double(), ref, atol=1e-5, rtol=1e-5)
    assert float(multiway_infonce(emb, cands, temperature=0.5)["contrastive_loss"]) != pytest.approx(float(ref))


def test_drift_loss_values_and_distributed_normalisation():
    emb, rows, langs = flat_batch()
    ref = F.normalize(emb + 0.1 * torch.randn_like(emb), dim=-1)
    cos = (emb * ref).sum(-1)
    out = drift_loss(emb, ref, weight=2.0, kind="cosine")
    assert float(out["drift_loss"]) == pytest.approx(2.0 * float((1 - cos).mean()))
    mse = drift_loss(emb, ref, weight=1.0, kind="mse")
    assert float(mse["drift"]) == pytest.approx(2.0 * float((1 - cos).mean()))  # unit vectors
    assert float(drift_loss(emb, emb.clone(), weight=1.0)["drift_loss"]) == pytest.approx(0.0, abs=1e-12)
    # Distributed: rank-local sums / global count * world, averaged over ranks = global mean.
    halves = [slice(0, 9), slice(9, None)]
    fake = [GlobalCandidates.single(emb, rows, langs) for _ in halves]
    for c in fake:
        c.world_size = 2
    local = [drift_loss(emb[h], ref[h], 2.0, candidates=c)["drift_loss"] for h, c in zip(halves, fake)]
    assert float(sum(local) / 2) == pytest.approx(float(out["drift_loss"]))


def test_total_loss_sums_only_loss_terms():
    terms = {"contrastive_loss": torch.tensor(1.5), "drift_loss": torch.tensor(0.25), "pos_cos": torch.tensor(9.0)}
    assert float(total_loss(terms)) == 1.75


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        ({"objective": "triplet"}, "--model.loss.objective"),
        ({"temperature": 0.0, "min_temperature": 0.0}, "--model.loss.min_temperature"),
        ({"temperature": 5.0}, "--model.loss.temperature"),
        ({"margin": -0.1}, "--model.loss.margin"),
        ({"bidirectional": False}, "--model.loss.bidirectional"),
        ({"drift_weight": -1.0}, "--model.loss.drift_weight"),
        ({"drift_kind": "l1"}, "--model.loss.drift_kind"),
    ],
)
def test_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        LossConfig(**kwargs)


def test_single_rejects_bad_ids():
    emb, rows, langs = flat_batch()
    with pytest.raises(ValueError, match="row_ids and lang_ids"):
        GlobalCandidates.single(emb, rows - 1, langs)
    with pytest.raises(ValueError, match="expected embeddings"):
        GlobalCandidates.single(emb, rows[:-1], langs)


@pytest.mark.parametrize("module", ["alignment/losses.py", "alignment/model.py"])
def test_pure_modules_import_neither_lightning_nor_torch_distributed(module):
    tree = ast.parse((REPO / module).read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    forbidden = [n for n in names if n.startswith(("lightning", "pytorch_lightning", "torch.distributed",
                                                   "alignment.distributed"))]
    assert forbidden == []


def test_gather_candidates_at_world_size_one_is_the_single_process_batch():
    """No process group: the same code path with identity collectives."""
    from alignment.distributed import gather_candidates

    emb, rows, langs = flat_batch()
    ours = gather_candidates(emb, rows, langs)
    single = GlobalCandidates.single(emb, rows, langs)
    for field in ("emb", "row_ids", "lang_ids", "valid", "local_index"):
        torch.testing.assert_close(getattr(ours, field), getattr(single, field))
    assert (ours.num_rows, ours.num_languages, ours.num_sentences, ours.world_size) == (len(ROWS), 4, len(rows), 1)
    with pytest.raises(ValueError, match="18 embeddings but row_ids \\(17,\\)"):
        gather_candidates(emb, rows[:-1], langs)
    with pytest.raises(ValueError, match="negative row or language id"):
        gather_candidates(emb, rows - 1, langs)
    with pytest.raises(ValueError, match="must be int64"):
        gather_candidates(emb, rows.int(), langs)
