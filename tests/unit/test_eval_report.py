"""The evaluation suite and report writer: metrics.json, Markdown tables, PNG figures, flat metrics, PCA."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignment.evaluate.embeddings import MultiWayEmbeddings
from alignment.evaluate.figures import pca_2d
from alignment.evaluate.procrustes import ProcrustesConfig
from alignment.evaluate.report import markdown_table, write_report
from alignment.evaluate.retrieval import RetrievalConfig
from alignment.evaluate.suite import EvalConfig, evaluate_embeddings, flat_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LANGS = ("en", "de", "fr", "ja")


def build(rows: int = 60, dim: int = 16, seed: int = 0, drop_nan: bool = False) -> MultiWayEmbeddings:
    """Rows shared across languages plus per-language noise; ja is noisier (a weaker, 'unseen' language)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, dim, generator=g)
    vectors, row_ids, langs = [], [], []
    for lang in LANGS:
        noise = 1.5 if lang == "ja" else 0.3
        vectors.append(base + noise * torch.randn(rows, dim, generator=g))
        row_ids += [f"row{i}" for i in range(rows)]
        langs += [lang] * rows
    x = torch.cat(vectors)
    if drop_nan:
        x[rows + 1] = float("nan")  # a de sentence
    return MultiWayEmbeddings(x, row_ids, langs, "en", on_invalid="drop" if drop_nan else "raise")


@pytest.fixture(scope="module")
def results():
    emb = build(drop_nan=True)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(20, 16, generator=g)
    sts = {"toy-sts": (a, a + 0.5 * torch.randn(20, 16, generator=g), torch.linspace(5, 0, 20))}
    config = EvalConfig(retrieval=RetrievalConfig(ks=(1, 5)), hubness_k=5, procrustes=ProcrustesConfig(fit_rows=30))
    res = evaluate_embeddings(
        emb,
        config,
        training_languages=["en", "de", "fr"],
        row_labels={f"row{i}": i % 2 for i in range(60)},
        sts_sets=sts,
        meta={"model": "tiny-test"},
    )
    return emb, res


def test_flat_metrics_names_and_values(results):
    _, res = results
    flat = flat_metrics(res, prefix="val/")
    for key in (
        "val/retrieval_acc/mean",
        "val/retrieval_acc/de-en",
        "val/retrieval_acc/seen_mean",
        "val/retrieval_acc/mixed_mean",
        "val/xsim/mean",
        "val/mrr/mean",
        "val/recall@5/mean",
        "val/lang_id_acc",
        "val/cos_gap",
        "val/hubness_skew/ja",
        "val/transfer_acc/de",
        "val/sts_spearman/toy-sts",
        "val/procrustes/retrieval_acc_after/mean",
        "val/invalid_embeddings",
    ):
        assert key in flat, key
    assert all(isinstance(v, float) and math.isfinite(v) for v in flat.values())
    assert flat["val/invalid_embeddings"] == 1.0
    assert "val/retrieval_acc/unseen_mean" not in flat  # ja is the only unseen language: no unseen-unseen pair
    # seen pairs (en, de, fr among themselves) retrieve better than pairs with the noisy unseen ja
    assert flat["val/retrieval_acc/seen_mean"] > flat["val/retrieval_acc/mixed_mean"]
    assert flat["val/retrieval_acc/mean"] == pytest.approx(res.retrieval.mean("accuracy"))
    assert "val/recall@1/mean" not in flat  # recall@1 is accuracy


def test_write_report_outputs(tmp_path, results):
    emb, res = results
    paths = write_report(res, tmp_path / "report", embeddings=emb, title="Tiny eval")

    data = json.loads(paths.metrics_json.read_text())
    assert data["summary"]["model"] == "tiny-test"
    assert data["summary"]["training_languages"] == ["en", "de", "fr"]
    assert data["metrics"]["retrieval_acc/mean"] == pytest.approx(res.retrieval.mean("accuracy"))
    assert len(data["retrieval"]["pairs"]) == 12
    assert data["retrieval"]["per_language"]["ja"]["group"] == "unseen"
    assert set(data["retrieval"]["groups"]) == {"seen", "mixed"}
    assert data["invalid_embeddings"] == {"de": {"non_finite": 1, "zero_norm": 0}}
    assert len(data["procrustes"]["accuracy"]) == 12
    assert data["sts"][0]["name"] == "toy-sts"

    md = paths.markdown.read_text()
    assert md.startswith("# Tiny eval")
    for heading in (
        "## Summary",
        "## Retrieval by pair",
        "## Retrieval by language",
        "## Seen vs unseen languages",
        "## Alignment diagnostics",
        "### Hubness",
        "## Cross-lingual classification transfer",
        "## STS",
        "## Post-hoc Procrustes",
        "## Invalid embeddings",
        "## Figures",
    ):
        assert heading in md, heading
    assert "| pair | group | queries | accuracy | mrr | recall@5 | xsim_error |" in md
    de_en = next(r for r in res.retrieval.results if r.key == "de-en")
    assert f"| de-en | seen | {de_en.num_queries} | {de_en.accuracy:.4f} |" in md
    assert "| ja | unseen |" in md
    assert "![retrieval_heatmap](figures/retrieval_heatmap.png)" in md

    from matplotlib.image import imread

    assert {p.name for p in paths.figures} == {"projection.png", "retrieval_heatmap.png", "per_language.png"}
    for png in paths.figures:
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        image = imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.01  # something was drawn


def test_report_without_embeddings_or_optional_parts(tmp_path):
    emb = build(rows=20)
    res = evaluate_embeddings(emb, EvalConfig(diagnostics=False, hubness_k=0))
    paths = write_report(res, tmp_path)
    assert [p.name for p in paths.figures] == ["retrieval_heatmap.png", "per_language.png"]
    md = paths.markdown.read_text()
    assert "## Seen vs unseen" not in md and "## Alignment diagnostics" not in md
    assert "training languages: unknown" in md
    data = json.loads(paths.metrics_json.read_text())
    assert "language_id" not in data and data["summary"]["training_languages"] is None


def test_nan_values_become_json_null(tmp_path):
    emb = MultiWayEmbeddings(torch.randn(4, 3), ["a", "a", "b", "b"], ["en", "de", "en", "fr"])
    res = evaluate_embeddings(emb, EvalConfig(diagnostics=False, hubness_k=0))
    # de and fr never share a row: those pairs are skipped and the heatmap cells stay empty (NaN)
    assert ("de", "fr") in res.retrieval.skipped
    paths = write_report(res, tmp_path)
    data = json.loads(paths.metrics_json.read_text())  # strict JSON: allow_nan=False when written
    assert data["retrieval"]["skipped"] == ["de-fr", "fr-de"]


def test_markdown_table_format():
    table = markdown_table(("a", "b"), [("x", 0.5), ("y", float("nan"))])
    assert table.splitlines() == ["| a | b |", "| --- | --- |", "| x | 0.5000 |", "| y | - |"]


def test_pca_2d_recovers_principal_axes():
    g = torch.Generator().manual_seed(2)
    scales = torch.tensor([5.0, 2.0, 0.1, 0.1])
    x = torch.randn(500, 4, generator=g) * scales  # variance along axes 0 > 1 > others
    coords, idx = pca_2d(x, max_points=None)
    assert coords.shape == (500, 2) and idx.tolist() == list(range(500))
    centred = x - x.mean(dim=0)
    # components are +e0 and +e1 (signs fixed so the largest loading is positive)
    cosine = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    assert cosine(coords[:, 0], centred[:, 0]) > 0.999 and cosine(coords[:, 1], centred[:, 1]) > 0.99
    assert coords[:, 0].var() > coords[:, 1].var() > 10 * centred[:, 2].var()
    again, _ = pca_2d(x, max_points=None)
    assert torch.equal(coords, again)
    sub, sub_idx = pca_2d(x, max_points=100, seed=0)
    assert sub.shape == (100, 2) and sub_idx.unique().numel() == 100
