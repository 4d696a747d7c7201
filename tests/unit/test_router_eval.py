"""``align eval`` / ``align fit-map`` / ``align mine`` on sentence-transformers ``Router`` exports, along the user's
path: ``align fit`` with language adapters -> ``align export`` (a Router, one merged encoder per adapter), and
``align fit-map --export`` (maps carried by a Router) -> ``align eval --model EXPORT``. Retrieval must equal the
retrieval of ``SentenceTransformer(EXPORT).encode(texts, task=LANG)`` per language (accuracies: same within 1e-9;
the same embeddings up to float32 batching noise). Maps exports refuse a language without a map, before encoding.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from sentence_transformers import SentenceTransformer

from alignment.cli import main
from alignment.evaluate.embeddings import MultiWayEmbeddings
from alignment.evaluate.encode import EncodeConfig, encode_texts
from alignment.evaluate.encoder import RouterEncoder, load_encoder
from alignment.evaluate.readers import load_eval_data
from alignment.evaluate.retrieval import evaluate_retrieval
from alignment.export import export_encoder
from alignment.model import DualEncoder
from tests import _training as T

EVAL = ["--split", "test", "--hubness_k", "0", "--diagnostics", "false", "--encode.quiet", "true"]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["align"])


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """``(root, corpus, adapter export, plain export, maps export)``."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("router-eval")
    corpus = T.make_corpus(root / "data", rows=96, rows_per_shard=32)
    torch.manual_seed(0)
    encoder = DualEncoder.from_config(DualEncoder.tiny_config(corpus.vocab_size))
    encoder.save_pretrained(root / "base")
    (root / "csv.yaml").write_text(T.CSV_ONLY)
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    try:
        rc = main(["fit", "--config", str(T.DEBUG_YAML), "--config", "csv.yaml",
                   "--config", str(T.REPO / "configs" / "recipes" / "adapters" / "language-adapters.yaml"),
                   "--model.encoder.adapter.language_groups", "{de: germanic, fr: romance, es: romance}",
                   "--model.encoder.name_or_path", str(root / "base"), "--model.optim.lr", "5e-2",
                   "--data.train_shards", str(corpus.shards), "--data.tokenizer", str(corpus.tokenizer),
                   "--data.batch_size", "8", "--trainer.limit_val_batches", "0", "--trainer.max_steps", "3",
                   "--export.dir", ""])  # fmt: skip
    finally:
        mp.undo()
    assert rc == 0
    adapters = root / "adapters"
    assert main(["export", str(root / "runs" / "debug" / "checkpoints" / "last.ckpt"), str(adapters)]) == 0
    plain = export_encoder(encoder, root / "plain", tokenizer=AutoTokenizer.from_pretrained(str(corpus.tokenizer)))
    assert main(["fit-map", "--model", str(plain), "--data", str(corpus.shards), "--split", "train",
                 "--languages", "en,de,fr", "--kind", "centring+procrustes", "--out", str(root / "maps"),
                 "--export", str(root / "plain-maps"), "--encode.quiet", "true"]) == 0  # fmt: skip
    return root, corpus, adapters, plain, root / "plain-maps"


def _st_retrieval(folder, corpus, languages) -> dict[str, float]:
    """Retrieval accuracy per pair on ``SentenceTransformer(folder).encode(texts, task=lang)``."""
    data = load_eval_data(str(corpus.shards), split="test")
    st = SentenceTransformer(str(folder), device="cpu")
    vectors, ids, langs = [], [], []
    for lang in languages:
        rows = [row for row in data.rows if lang in row.texts]
        vectors.append(st.encode([row.texts[lang] for row in rows], task=lang, convert_to_tensor=True).cpu())
        ids += [row.id for row in rows]
        langs += [lang] * len(rows)
    table = evaluate_retrieval(MultiWayEmbeddings(torch.cat(vectors), ids, langs))
    return {result.key: result.value("accuracy") for result in table.results}


def _eval_retrieval(out) -> dict[str, float]:
    metrics = json.loads((out / "metrics.json").read_text())
    return {f"{r['src']}-{r['tgt']}": r["accuracy"] for r in metrics["retrieval"]["pairs"]}


def test_eval_of_a_language_adapter_export_routes_each_language(exports, capsys):
    root, corpus, adapters, _, _ = exports
    model, _, info = load_encoder(adapters)
    assert isinstance(model, RouterEncoder) and set(model.routes) == {"default", "germanic", "romance"}
    assert main(["eval", "--model", str(adapters), "--data", str(corpus.shards), "--out", str(root / "e1"), *EVAL]) == 0
    got, want = _eval_retrieval(root / "e1"), _st_retrieval(adapters, corpus, T.LANGUAGES)
    assert got.keys() == want.keys() and len(got) == 12
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    # the routes matter: German through the shared adapter (no task) differs from German through its own
    texts = [r.texts["de"] for r in load_eval_data(str(corpus.shards), split="train").rows if "de" in r.texts][:8]
    st = SentenceTransformer(str(adapters), device="cpu")
    routed = model.encode_language(texts, "de", batch_size=4, max_length=128)
    torch.testing.assert_close(routed, st.encode(texts, task="de", convert_to_tensor=True).cpu(), atol=1e-5, rtol=0)
    assert (routed - model.encode_language(texts, None, batch_size=4, max_length=128)).abs().max() > 1e-4

    # a language-adapter Router export has no single graph: --format onnx is refused with the reason
    ckpt = root / "runs" / "debug" / "checkpoints" / "last.ckpt"
    assert main(["export", str(ckpt), str(root / "adapters-onnx"), "--format", "onnx"]) != 0
    assert "--format onnx and --maps apply to a plain (merged) export" in capsys.readouterr().err


def test_eval_of_a_maps_export_applies_its_maps_and_refuses_unmapped_languages(exports, capsys):
    root, corpus, _, plain, maps_export = exports
    mapped = ["--data", str(corpus.shards), "--languages", "en,de,fr", *EVAL]
    assert main(["eval", "--model", str(maps_export), "--out", str(root / "e2"), *mapped]) == 0
    got, want = _eval_retrieval(root / "e2"), _st_retrieval(maps_export, corpus, ("en", "de", "fr"))
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    # the same numbers as `align eval --maps` (the maps applied at eval time) on the plain export
    assert main(["eval", "--model", str(plain), "--maps", str(maps_export), "--out", str(root / "e3"), *mapped]) == 0
    after = {row["pair"]: row["after"] for row in json.loads((root / "e3" / "metrics.json").read_text())["maps"]["accuracy"]}
    for key, value in want.items():
        assert after[key] == pytest.approx(value, abs=1e-9), key
    # --maps on the maps export itself: its base is evaluated, the maps applied once
    assert main(["eval", "--model", str(maps_export), "--maps", str(maps_export), "--out", str(root / "e4"),
                 *mapped]) == 0  # fmt: skip
    assert json.loads((root / "e4" / "metrics.json").read_text())["maps"] == json.loads(
        (root / "e3" / "metrics.json").read_text())["maps"]
    capsys.readouterr()
    # es has no map and the maps Router has no default route: refused, naming it, before encoding
    rc = main(["eval", "--model", str(maps_export), "--data", str(corpus.shards), "--out", str(root / "e5"), *EVAL])
    assert rc == 1
    err = capsys.readouterr().err
    assert "cannot encode language 'es'" in err and "no default route" in err and "--languages" in err


def test_mine_and_fit_map_on_router_exports(exports, capsys):
    root, corpus, adapters, _, maps_export = exports
    data = load_eval_data(str(corpus.shards), split="train", max_rows=24)
    en, de = ([row.texts[lang] for row in data.rows if "en" in row.texts and "de" in row.texts] for lang in ("en", "de"))
    (root / "en.txt").write_text("\n".join(en) + "\n")
    (root / "de.txt").write_text("\n".join(de) + "\n")
    # align mine gives no language: the adapter export's default route (SentenceTransformer.encode without task)
    assert main(["mine", str(root / "en.txt"), str(root / "de.txt"), "--model", str(adapters), "--out",
                 str(root / "mined.tsv"), "--encode.quiet", "true"]) == 0  # fmt: skip
    model, tokenizer, _ = load_encoder(adapters)  # what align mine encodes with: no language, the default route
    got = encode_texts(model, tokenizer, en, EncodeConfig(quiet=True))
    want = SentenceTransformer(str(adapters), device="cpu").encode(en, convert_to_tensor=True).cpu()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    capsys.readouterr()
    # the maps export has no default route: mine (no language) is refused with the reason
    assert main(["mine", str(root / "en.txt"), str(root / "de.txt"), "--model", str(maps_export), "--out",
                 str(root / "mined2.tsv"), "--encode.quiet", "true"]) != 0  # fmt: skip
    assert "no default route" in capsys.readouterr().err
    # align fit-map on the adapter export: maps fitted on the routed embeddings, checked by align eval --maps
    assert main(["fit-map", "--model", str(adapters), "--data", str(corpus.shards), "--split", "train",
                 "--kind", "centring", "--out", str(root / "amaps"), "--encode.quiet", "true"]) == 0  # fmt: skip
    assert main(["eval", "--model", str(adapters), "--maps", str(root / "amaps"), "--data", str(corpus.shards),
                 "--out", str(root / "e6"), *EVAL]) == 0  # fmt: skip
    metrics = json.loads((root / "e6" / "metrics.json").read_text())
    before = {row["pair"]: row["before"] for row in metrics["maps"]["accuracy"]}
    for key, value in _st_retrieval(adapters, corpus, T.LANGUAGES).items():
        assert before[key] == pytest.approx(value, abs=1e-9), key
