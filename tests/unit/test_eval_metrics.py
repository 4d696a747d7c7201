"""Evaluation metrics from embeddings: retrieval, margin/xSIM, STS, probes, hubness, cosine gap, Procrustes.

Values are checked against hand computations, loop-based references of the
published algorithms (LASER's xSIM), or known limits (perfect alignment scores
1, independent embeddings score at chance).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignment.evaluate.embeddings import InvalidEmbeddingsError, MultiWayEmbeddings, row_mask_from_keys
from alignment.evaluate.metrics import (
    cosine_gap,
    gold_ranks,
    hubness,
    k_occurrence,
    rank_metrics,
    skewness,
    torchmetrics_rank_metrics,
    xsim_error_rate,
)
from alignment.evaluate.probes import ProbeConfig, classification_transfer, language_id_probe, row_split, sts_spearman
from alignment.evaluate.procrustes import (
    ProcrustesConfig,
    evaluate_procrustes,
    fit_procrustes,
    orthogonal_procrustes,
    split_fit_rows,
)
from alignment.evaluate.retrieval import RetrievalConfig, evaluate_pair, evaluate_retrieval, pair_group
from alignment.evaluate.search import margin_matrix, margin_search
from alignment.evaluate.suite import EvalConfig, validation_metrics

LANGS = ("en", "de", "fr", "es")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def multiway(per_lang: dict[str, torch.Tensor], pivot: str = "en") -> MultiWayEmbeddings:
    """Container from ``{lang: (R, D)}`` with row ``i`` of each language translating row ``i`` of the others."""
    vectors, rows, langs = [], [], []
    for lang, x in per_lang.items():
        vectors.append(x)
        rows += [f"r{i}" for i in range(x.shape[0])]
        langs += [lang] * x.shape[0]
    return MultiWayEmbeddings(torch.cat(vectors), rows, langs, pivot)


def noisy(rows: int, dim: int, noise: float, seed: int, langs=LANGS) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    base = torch.randn(rows, dim, generator=g)
    return {lang: base + noise * torch.randn(rows, dim, generator=g) for lang in langs}


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1)


def rotation(dim: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=_gen(seed), dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()  # (D, D) Haar-random orthogonal


# --------------------------------------------------------------------------- retrieval


def test_perfectly_aligned_embeddings_score_one():
    emb = multiway(noisy(50, 16, 0.0, seed=0))
    table = evaluate_retrieval(emb)
    assert len(table.results) == 12  # 4 x 3 ordered pairs
    for r in table.results:
        assert (r.accuracy, r.mrr, r.recall[5], r.recall[10], r.xsim_error) == (1.0, 1.0, 1.0, 1.0, 0.0), r
        assert r.num_queries == 50


def test_independent_embeddings_score_at_chance():
    rows = 400
    emb = multiway(noisy(rows, 64, 1e6, seed=1))  # noise swamps the shared part: languages independent
    table = evaluate_retrieval(emb, RetrievalConfig(ks=(1, 10)))
    harmonic = sum(1.0 / i for i in range(1, rows + 1))
    assert table.mean("accuracy") == pytest.approx(1 / rows, abs=0.005)
    assert table.mean("recall@10") == pytest.approx(10 / rows, abs=0.01)
    assert table.mean("mrr") == pytest.approx(harmonic / rows, abs=0.008)  # E[1/rank] for a uniform rank
    assert table.mean("xsim_error") == pytest.approx(1 - 1 / rows, abs=0.005)


def test_gold_ranks_hand_computed():
    # unit vectors at angles: queries 0, 90, 180 degrees; keys 10, 45, 100 degrees
    angle = lambda deg: torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in deg])  # noqa: E731
    queries, keys = angle([0, 90, 180]), angle([10, 45, 100])
    # query 1 (90 deg): cos to key 2 (10 deg apart) beats its gold key 1 (45 deg apart)
    ranks = gold_ranks(queries, keys)
    assert ranks.tolist() == [1, 2, 1]
    metrics = rank_metrics(ranks, ks=(1, 2))
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["mrr"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert metrics["recall@2"] == 1.0


def test_collapsed_encoder_ranks_last_not_first():
    """Regression: optimistic tie-breaking would give a collapsed encoder (all vectors equal) 100 % accuracy."""
    emb = multiway({lang: torch.ones(10, 4) for lang in ("en", "de")})
    r = evaluate_pair(emb, "de", "en")
    assert r.accuracy == 0.0
    assert r.mrr == pytest.approx(0.1)  # every gold ranks 10th of 10
    assert gold_ranks(torch.ones(3, 2), torch.ones(3, 2)).tolist() == [3, 3, 3]


def test_rank_path_agrees_with_torchmetrics():
    """Also pins a torchmetrics hazard: it drops targets scored <= 0, so negative gold cosines got MRR 0."""
    emb = multiway(noisy(120, 16, 1.2, seed=2))
    x, y = emb.pair("de", "en")
    direct = rank_metrics(gold_ranks(x, y, chunk_size=17), ks=(1, 5, 10))
    reference = torchmetrics_rank_metrics(x @ y.T, ks=(1, 5, 10))
    assert 0.2 < direct["accuracy"] < 0.95  # a non-trivial case
    assert (x * y).sum(dim=1).min() < 0  # some gold translations have a negative cosine
    assert direct == pytest.approx(reference, abs=1e-6)
    via_tm = evaluate_pair(emb, "de", "en", RetrievalConfig(metrics_backend="torchmetrics"))
    via_rank = evaluate_pair(emb, "de", "en", RetrievalConfig(chunk_size=7))
    assert via_tm.accuracy == pytest.approx(via_rank.accuracy) and via_tm.mrr == pytest.approx(via_rank.mrr)


def _reference_margin(x: torch.Tensor, y: torch.Tensor, k: int, kind: str) -> torch.Tensor:
    """Loop-based margin (Artetxe & Schwenk 2019a): cos(x, y) op (sum_NN(x)/2k + sum_NN(y)/2k)."""
    nx, ny = x.shape[0], y.shape[0]
    out = torch.empty(nx, ny, dtype=torch.float64)
    for i in range(nx):
        for j in range(ny):
            cos = float(x[i] @ y[j])
            nn_x = sorted((float(x[i] @ y[t]) for t in range(ny)), reverse=True)[:k]
            nn_y = sorted((float(y[j] @ x[s]) for s in range(nx)), reverse=True)[:k]
            denom = sum(nn_x) / (2 * k) + sum(nn_y) / (2 * k)
            out[i, j] = cos / denom if kind == "ratio" else cos - denom
    return out


@pytest.mark.parametrize("kind", ["ratio", "distance"])
def test_margin_matches_loop_reference(kind):
    g = _gen(3)
    x, y = unit(torch.randn(7, 8, generator=g) + 1.0), unit(torch.randn(9, 8, generator=g) + 1.0)
    expected = _reference_margin(x, y, 3, kind)
    assert torch.allclose(margin_matrix(x, y, k=3, margin=kind).double(), expected, atol=1e-5)
    search = margin_search(x, y, k=3, margin=kind, chunk_size=2)
    assert torch.allclose(search.fwd_scores.double(), expected.gather(1, search.fwd_index), atol=1e-5)
    assert torch.allclose(search.bwd_scores.double(), expected.T.gather(1, search.bwd_index), atol=1e-5)


def _reference_xsim(x: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """LASER source/xsim.py with loops: best ratio margin among each source's k cosine neighbours."""
    n = x.shape[0]
    cos = (x @ y.T).tolist()
    fwd = [sum(sorted(cos[i], reverse=True)[:k]) / k for i in range(n)]
    bwd = [sum(sorted((cos[s][j] for s in range(n)), reverse=True)[:k]) / k for j in range(n)]
    errors = 0
    for i in range(n):
        candidates = sorted(range(n), key=lambda j: -cos[i][j])[:k]
        best = max(candidates, key=lambda j: cos[i][j] / ((fwd[i] + bwd[j]) / 2))
        errors += best != i
    return errors / n


def test_xsim_matches_loop_reference():
    x, y = (unit(v) for v in noisy(60, 12, 1.0, seed=4, langs=("de", "en")).values())
    error = xsim_error_rate(x, y, k=4)
    assert 0.05 < error < 0.9
    assert error == pytest.approx(_reference_xsim(x, y, 4))


def test_margin_corrects_a_hub_that_cosine_retrieval_falls_for():
    g = _gen(5)
    n, d = 80, 64
    hub = torch.zeros(d)
    hub[0] = 1.0
    u = unit(torch.randn(n, d, generator=g) * (torch.arange(d) > 0))  # orthogonal to the hub direction
    x = unit(hub + u)  # every source shares the hub direction: cos(x_i, hub) = 0.71
    y = unit(u + 0.7 * torch.randn(n, d, generator=g) / d**0.5)
    y[0] = hub  # target 0 is the hub (its source is lost)
    cos_error = xsim_error_rate(x, y, margin="absolute")
    margin_error = xsim_error_rate(x, y, margin="ratio")
    assert cos_error > 0.9  # nearly every source retrieves the hub
    assert margin_error < 0.05


def test_pairs_modes_and_seen_unseen_groups():
    emb = multiway(noisy(20, 8, 0.1, seed=6))
    pivot_pairs = [r.key for r in evaluate_retrieval(emb, RetrievalConfig(pairs="pivot")).results]
    assert sorted(pivot_pairs) == sorted(["de-en", "en-de", "fr-en", "en-fr", "es-en", "en-es"])
    table = evaluate_retrieval(emb, training_languages=["en", "de"])
    assert {table.group(r) for r in table.results} == {"seen", "mixed", "unseen"}
    assert pair_group("de", "en", ["en", "de"]) == "seen"
    assert pair_group("fr", "es", ["en", "de"]) == "unseen"
    assert pair_group("fr", "en", ["en", "de"]) == "mixed"
    assert pair_group("fr", "en", None) == "all"
    langs, mat = table.matrix("accuracy")
    assert langs == ["de", "en", "es", "fr"] and torch.isnan(mat.diagonal()).all()
    assert mat[0, 1] == next(r.accuracy for r in table.results if r.key == "de-en")


def test_numpy_and_torch_inputs_agree():
    data = noisy(30, 8, 0.8, seed=7, langs=("en", "de"))
    vectors = torch.cat(list(data.values()))
    rows = [f"r{i}" for i in range(30)] * 2
    langs = ["en"] * 30 + ["de"] * 30
    a = evaluate_pair(MultiWayEmbeddings(vectors, rows, langs), "de", "en")
    b = evaluate_pair(MultiWayEmbeddings(vectors.numpy(), np.array(rows), langs), "de", "en")
    assert a == b


# --------------------------------------------------------------------------- bad input


def test_nan_and_zero_norm_embeddings_are_reported_not_scored():
    data = noisy(10, 4, 0.1, seed=8, langs=("en", "de"))
    data["de"][[2, 5]] = float("nan")
    data["en"][7] = 0.0
    with pytest.raises(InvalidEmbeddingsError) as info:
        multiway(data)
    message = str(info.value)
    assert "2 NaN/inf embeddings [de: 2 (rows 'r2', 'r5')]" in message
    assert "1 zero-norm embeddings [en: 1 (rows 'r7')]" in message
    vectors = torch.cat(list(data.values()))
    rows, langs = [f"r{i}" for i in range(10)] * 2, ["en"] * 10 + ["de"] * 10
    dropped = MultiWayEmbeddings(vectors, rows, langs, on_invalid="drop")
    assert dropped.invalid == {"de": {"non_finite": 2, "zero_norm": 0}, "en": {"non_finite": 0, "zero_norm": 1}}
    assert dropped.num_sentences == 17
    assert evaluate_pair(dropped, "de", "en").num_queries == 7  # rows 2, 5, 7 lack a pair


def test_missing_language_and_empty_pair_are_named():
    emb = multiway(noisy(5, 4, 0.1, seed=9, langs=("en", "de")))
    with pytest.raises(ValueError, match="language 'fr' has no sentences in these embeddings"):
        evaluate_retrieval(emb, pairs=[("de", "fr")])
    split = MultiWayEmbeddings(torch.randn(4, 4), ["a", "a", "b", "c"], ["en", "de", "en", "fr"])
    with pytest.raises(ValueError, match="pair de-fr: no row has both languages"):
        evaluate_retrieval(split, pairs=[("de", "fr")])
    assert ("de", "fr") in evaluate_retrieval(split).skipped  # generated pairs are skipped and listed


def test_duplicate_row_language_is_named():
    with pytest.raises(ValueError, match="row 'r1' has 2 sentences in language 'de'"):
        MultiWayEmbeddings(torch.randn(3, 4), ["r1", "r1", "r1"], ["en", "de", "de"])


def test_row_selection_by_key_and_language_ids():
    emb = multiway(noisy(6, 4, 0.1, seed=23, langs=("en", "de")))
    subset = emb.select_rows(row_mask_from_keys(emb, ["r1", "r4"]))
    assert subset.row_keys == ("r1", "r4") and subset.num_sentences == 4
    x, y = subset.pair("de", "en")
    full_x, full_y = emb.pair("de", "en")
    assert torch.allclose(x, full_x[[1, 4]]) and torch.allclose(y, full_y[[1, 4]])
    with pytest.raises(ValueError, match="1 row ids are not in the embeddings"):
        row_mask_from_keys(emb, ["r1", "missing"])
    with pytest.raises(ValueError, match="lang_ids contain 1 ids outside the vocabulary of 2 languages"):
        MultiWayEmbeddings.from_ids(torch.randn(2, 4), [0, 0], [0, 5], ["en", "de"])


def test_configs_name_the_flag():
    with pytest.raises(ValueError, match=r"--retrieval.margin_k must be >= 1, got 0"):
        RetrievalConfig(margin_k=0)
    with pytest.raises(ValueError, match=r"--retrieval.margin must be one of"):
        RetrievalConfig(margin="cosine")
    with pytest.raises(ValueError, match=r"--probe.test_fraction must be between 0 and 1"):
        ProbeConfig(test_fraction=1.0)
    with pytest.raises(ValueError, match=r"--procrustes.fit_rows must be >= 1, got 0"):
        ProcrustesConfig(fit_rows=0)
    with pytest.raises(ValueError, match=r"--hubness_k must be >= 0"):
        EvalConfig(hubness_k=-1)


# --------------------------------------------------------------------------- STS


def _pairs_with_cosines(cosines: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    theta = torch.tensor([math.acos(c) for c in cosines])
    a = torch.tensor([[1.0, 0.0]]).repeat(len(cosines), 1)
    b = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    return a, b


def test_sts_spearman_on_known_rankings():
    a, b = _pairs_with_cosines([0.9, 0.7, 0.5, 0.3, 0.1])
    assert sts_spearman(a, b, [5, 4, 3, 2, 1]).spearman == pytest.approx(1.0, abs=1e-5)
    assert sts_spearman(a, b, [1, 2, 3, 4, 5]).spearman == pytest.approx(-1.0, abs=1e-5)
    # rank differences (1, -1, 1, -1, 0): rho = 1 - 6 * 4 / (5 * 24) = 0.8
    result = sts_spearman(a.numpy(), b.numpy(), [4, 5, 2, 3, 1], name="toy")
    assert (result.name, result.num_pairs) == ("toy", 5)
    assert result.spearman == pytest.approx(0.8, abs=1e-5)
    with pytest.raises(ValueError, match="1 gold scores are not finite"):
        sts_spearman(a, b, [1, 2, float("nan"), 4, 5])


# --------------------------------------------------------------------------- hubness and cosine gap


def test_hubness_single_hub_matches_closed_form():
    g = _gen(10)
    d, q, m = 32, 30, 31
    centre = unit(torch.randn(1, d, generator=g))
    queries = unit(centre + 0.3 * torch.randn(q, d, generator=g) / d**0.5)
    keys = unit(torch.randn(m, d, generator=g))
    keys[0] = centre[0]  # the nearest neighbour of every query
    counts = k_occurrence(queries, keys, k=1)
    assert counts.tolist() == [q] + [0] * (m - 1)
    # one-hot counts: a two-point distribution with p = 1/m, skewness (1 - 2p) / sqrt(p (1 - p)) = 29 / sqrt(30)
    result = hubness(queries, keys, k=1)
    assert result.skewness == pytest.approx(29 / math.sqrt(30), rel=1e-6)
    assert result.max_occurrence == q and result.hub_share == pytest.approx(1 / m)


def test_hubness_uniform_case_is_zero():
    keys = unit(torch.randn(40, 16, generator=_gen(11)))
    result = hubness(keys, keys, k=1)  # each key is its own nearest neighbour: N_1 = 1 everywhere
    assert result.skewness == 0.0 and result.hub_share == 0.0
    counts = k_occurrence(keys, keys, k=5)
    assert int(counts.sum()) == 40 * 5
    assert skewness(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(0.0)


def test_cosine_gap_hand_computed():
    s = 1 / math.sqrt(2)
    emb = multiway({"en": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "de": torch.tensor([[1.0, 0.0], [s, s]])})
    gap = cosine_gap(emb)
    assert gap.translation == pytest.approx((1 + s) / 2)  # cos(e1, e1), cos(e2, (e1+e2)/sqrt2)
    assert gap.non_translation == pytest.approx((s + 0) / 2)  # cos(e1, (e1+e2)/sqrt2), cos(e2, e1)
    assert gap.gap == pytest.approx(0.5)
    assert (gap.num_language_pairs, gap.num_translation_pairs) == (1, 2)


def test_cosine_gap_matches_direct_computation():
    emb = multiway(noisy(25, 8, 0.7, seed=12, langs=("en", "de", "fr")))
    trans, non = [], []
    for a, b in (("de", "en"), ("de", "fr"), ("en", "fr")):
        x, y = emb.pair(a, b)
        sims = x @ y.T  # (25, 25)
        trans += sims.diagonal().tolist()
        non += sims[~torch.eye(25, dtype=torch.bool)].tolist()
    gap = cosine_gap(emb)
    assert gap.translation == pytest.approx(np.mean(trans), abs=1e-6)
    assert gap.non_translation == pytest.approx(np.mean(non), abs=1e-6)


# --------------------------------------------------------------------------- probes


def test_row_split_is_disjoint_deterministic_and_by_row():
    train, test = row_split(50, 0.3, seed=1)
    assert not (train & test).any() and (train | test).all() and int(test.sum()) == 15
    again, _ = row_split(50, 0.3, seed=1)
    other, _ = row_split(50, 0.3, seed=2)
    assert torch.equal(train, again) and not torch.equal(train, other)
    with pytest.raises(ValueError, match="at least 2 rows"):
        row_split(1, 0.5)


def test_language_id_probe_agnostic_vs_language_specific():
    rows, dim = 80, 16
    agnostic = multiway(noisy(rows, dim, 0.0, seed=13))
    result = language_id_probe(agnostic)
    # identical translations get identical predictions: exactly one of the 4 sentences of a test row is right
    assert result.accuracy == pytest.approx(0.25)
    assert result.chance == 0.25 and result.majority_baseline == pytest.approx(0.25)
    offsets = torch.randn(len(LANGS), dim, generator=_gen(14))
    specific = multiway(
        {lang: x + 3 * offsets[i] for i, (lang, x) in enumerate(noisy(rows, dim, 0.0, seed=13).items())}
    )
    result = language_id_probe(specific, ProbeConfig(test_fraction=0.25))
    assert result.accuracy == 1.0
    assert result.num_test == 4 * 20 and result.num_train == 4 * 60
    assert set(result.per_language) == set(LANGS)


def test_classification_transfer_aligned_vs_rotated_language():
    g = _gen(15)
    rows, dim, classes = 240, 16, 3
    labels = torch.arange(rows) % classes
    centroids = 2.0 * torch.randn(classes, dim, generator=g)
    base = centroids[labels] + torch.randn(rows, dim, generator=g)
    per_lang = {lang: base + 0.2 * torch.randn(rows, dim, generator=g) for lang in ("en", "de")}
    per_lang["fr"] = per_lang["de"] @ rotation(dim, seed=16)  # fr lives in a rotated space: no transfer
    emb = multiway(per_lang)
    result = classification_transfer(emb, {f"r{i}": f"class{int(c)}" for i, c in enumerate(labels)})
    assert result.pivot == "en" and result.classes == ("class0", "class1", "class2")
    assert result.pivot_accuracy > 0.9
    assert result.accuracy["de"] > 0.9
    assert result.accuracy["fr"] < 0.7
    assert result.num_test == {"de": 72, "en": 72, "fr": 72}
    with pytest.raises(ValueError, match="240 rows have no class label"):
        classification_transfer(emb, {"nope": 1})


# --------------------------------------------------------------------------- Procrustes


def test_procrustes_recovers_a_random_rotation():
    dim = 16
    q = rotation(dim, seed=17)
    x = torch.randn(100, dim, generator=_gen(18))
    w = orthogonal_procrustes(x, x @ q)
    assert torch.allclose(w, q, atol=1e-5)
    assert torch.allclose(w.T @ w, torch.eye(dim), atol=1e-5)


def test_procrustes_pipeline_fixes_a_rotated_language_on_held_out_rows():
    dim, rows = 16, 120
    en = torch.randn(rows, dim, generator=_gen(19))
    q = rotation(dim, seed=20)
    emb = multiway({"en": en, "de": en @ q, "fr": en + 0.05 * torch.randn(rows, dim, generator=_gen(21))})
    report, maps = evaluate_procrustes(emb, ProcrustesConfig(fit_rows=40, seed=0))
    assert maps.fit_pairs == {"de": 40, "fr": 40} and report.num_heldout_rows == 80
    assert torch.allclose(maps.maps["de"], q.T, atol=1e-5)
    before = {r.key: r.accuracy for r in report.before.results}
    after = {r.key: r.accuracy for r in report.after.results}
    assert before["de-en"] < 0.3 and after["de-en"] == 1.0
    assert after["fr-en"] == 1.0 and report.mean_delta("accuracy") > 0.3
    fit, heldout = split_fit_rows(emb, 40, seed=0)
    mapped = fit_procrustes(emb, fit).apply(emb.select_rows(heldout))
    x, y = mapped.pair("de", "en")
    assert torch.allclose(x, y, atol=1e-5)
    with pytest.raises(ValueError, match=r"--procrustes.fit_rows \(120\) must be smaller than the 120 rows"):
        evaluate_procrustes(emb, ProcrustesConfig(fit_rows=120))


def test_procrustes_warns_when_fewer_fit_rows_than_dimensions():
    dim, rows = 16, 60
    en = torch.randn(rows, dim, generator=_gen(22))
    emb = multiway({"en": en, "de": en @ rotation(dim, seed=23)})
    with pytest.warns(UserWarning, match=r"de \(10 rows\) .* fewer rows than the 16 dimensions"):
        evaluate_procrustes(emb, ProcrustesConfig(fit_rows=10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_procrustes(emb, ProcrustesConfig(fit_rows=16))


# --------------------------------------------------------------------------- validation hook


def test_validation_hook_flat_metrics_from_batch_layout():
    rows, dim = 40, 16
    data = noisy(rows, dim, 0.0, seed=22, langs=("en", "de", "fr"))
    vocabulary = ("de", "en", "fr")
    vectors = torch.cat([data[v] for v in vocabulary])
    row_ids = torch.arange(rows).repeat(3)
    lang_ids = torch.arange(3).repeat_interleave(rows)
    with torch.inference_mode():  # how Lightning runs validation
        metrics = validation_metrics(vectors, row_ids, lang_ids, "en", vocabulary=vocabulary)
    assert metrics["val/retrieval_acc/mean"] == 1.0
    assert metrics["val/retrieval_acc/de-en"] == 1.0
    assert metrics["val/xsim/mean"] == 0.0
    assert metrics["val/cos_gap"] > 0.9
    assert metrics["val/lang_id_acc"] == pytest.approx(1 / 3, abs=0.02)
    assert all(isinstance(v, float) and not math.isnan(v) for v in metrics.values())
    vectors[3] = float("nan")
    with pytest.raises(InvalidEmbeddingsError, match=r"de: 1 \(rows '3'\)"):
        validation_metrics(vectors, row_ids, lang_ids, "en", vocabulary=vocabulary)
