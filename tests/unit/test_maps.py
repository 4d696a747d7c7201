"""Post-hoc language maps along the user's path: ``align fit-map`` on a calibration split -> a maps folder and an
export carrying them -> ``SentenceTransformer(export).encode(texts, task=LANG)`` equals the eval-time mapped
embeddings (max abs difference <= 1e-5) -> ``align eval --maps`` reports unmapped vs mapped retrieval equal to
retrieval on the sentence-transformers embeddings. A language without a map is an error everywhere.

A tiny random encoder (no training needed: the maps are post hoc) on synthetic 4-language shards.
"""

from __future__ import annotations

import json

import pytest
import torch
from sentence_transformers import SentenceTransformer

from alignment.cli import main
from alignment.deploy.maps import LanguageMaps, UnmappedLanguageError
from alignment.evaluate.embeddings import MultiWayEmbeddings
from alignment.evaluate.encode import EncodeConfig, encode_texts
from alignment.evaluate.encoder import load_encoder
from alignment.evaluate.readers import load_eval_data
from alignment.evaluate.retrieval import evaluate_retrieval
from alignment.export import export_encoder
from alignment.model import DualEncoder
from tests import _training as T

ATOL = 1e-5


def _export(corpus, folder, seed):
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    encoder = DualEncoder.from_config(DualEncoder.tiny_config(corpus.vocab_size))
    return export_encoder(encoder, folder, tokenizer=AutoTokenizer.from_pretrained(str(corpus.tokenizer)))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("maps")
    corpus = T.make_corpus(root / "data", rows=160, rows_per_shard=40)
    export = _export(corpus, root / "export", seed=0)
    rc = main(["fit-map", "--model", str(export), "--data", str(corpus.shards), "--split", "train",
               "--calibration_rows", "80", "--kind", "centring+procrustes", "--out", str(root / "maps"),
               "--export", str(root / "export-maps"), "--encode.quiet", "true"])  # fmt: skip
    assert rc == 0
    return root, corpus, export


def _texts(corpus, lang, split="test"):
    data = load_eval_data(str(corpus.shards), split=split)
    return [row.texts[lang] for row in data.rows if lang in row.texts]


@pytest.mark.parametrize("lang", ["de", "en"])
def test_export_applies_the_maps_by_language(fitted, lang):
    root, corpus, export = fitted
    maps = LanguageMaps.load(root / "maps")
    assert maps.kind == "centring+procrustes" and set(maps.languages) == set(T.LANGUAGES)
    assert maps.calibration["rows"] == 80 and maps.model["fingerprint"].startswith("sha256:")
    texts = _texts(corpus, lang)
    model, tokenizer, _ = load_encoder(export)
    expected = maps.apply_tensor(encode_texts(model, tokenizer, texts, EncodeConfig(quiet=True)), lang)
    st = SentenceTransformer(str(root / "export-maps"), device="cpu")
    got = st.encode(texts, task=lang, convert_to_tensor=True, batch_size=16)
    assert torch.allclose(got.cpu(), expected, atol=ATOL), (got.cpu() - expected).abs().max()
    unmapped = torch.as_tensor(SentenceTransformer(str(export), device="cpu").encode(texts))
    assert (unmapped - expected).abs().max() > 1e-2  # the maps do change the vectors


def test_a_language_without_a_map_is_an_error(fitted):
    root, corpus, _ = fitted
    st = SentenceTransformer(str(root / "export-maps"), device="cpu")
    with pytest.raises(ValueError, match="No route found for task type 'ru'"):
        st.encode(["hallo"], task="ru")
    with pytest.raises(ValueError, match="Could not determine route"):
        st.encode(["hallo"])  # no language given
    with pytest.raises(UnmappedLanguageError, match="no centring\\+procrustes map for language 'ru'"):
        LanguageMaps.load(root / "maps").apply_tensor(torch.randn(2, 32), "ru")


def test_eval_maps_reports_unmapped_and_mapped_retrieval(fitted, capsys):
    root, corpus, _ = fitted  # the export with maps: the encoder and the maps it carries
    rc = main(["eval", "--model", str(root / "export-maps"), "--data", str(corpus.shards), "--split", "test", "--maps",
               str(root / "export-maps"), "--out", str(root / "eval"), "--hubness_k", "0", "--diagnostics", "false",
               "--train_languages", "en,de,fr,es", "--encode.quiet", "true"])  # fmt: skip
    assert rc == 0
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert "Post-hoc language maps" in (root / "eval" / "report.md").read_text()
    after = {row["pair"]: row["after"] for row in metrics["maps"]["accuracy"]}
    before = {row["pair"]: row["before"] for row in metrics["maps"]["accuracy"]}
    assert before == {f"{r['src']}-{r['tgt']}": r["accuracy"] for r in metrics["retrieval"]["pairs"]}
    # the same retrieval on what sentence-transformers gives with the maps
    data = load_eval_data(str(corpus.shards), split="test")
    st = SentenceTransformer(str(root / "export-maps"), device="cpu")
    vectors, ids, langs = [], [], []
    for lang in T.LANGUAGES:
        rows = [row for row in data.rows if lang in row.texts]
        vectors.append(st.encode([row.texts[lang] for row in rows], task=lang, convert_to_tensor=True).cpu())
        ids += [row.id for row in rows]
        langs += [lang] * len(rows)
    table = evaluate_retrieval(MultiWayEmbeddings(torch.cat(vectors), ids, langs))
    for result in table.results:
        assert after[result.key] == pytest.approx(result.value("accuracy"), abs=1e-9)


def test_maps_of_another_model_are_refused(fitted, capsys):
    root, corpus, _ = fitted
    other = _export(corpus, root / "other", seed=1)
    rc = main(["eval", "--model", str(other), "--data", str(corpus.shards), "--maps", str(root / "maps"),
               "--out", str(root / "eval-other"), "--encode.quiet", "true"])  # fmt: skip
    assert rc == 1
    assert "fitted with another model" in capsys.readouterr().err


def test_fit_map_flags_are_checked_before_compute(fitted, capsys):
    root, corpus, export = fitted
    with pytest.raises(SystemExit) as exit_info:
        main(["fit-map", "--model", str(export), "--data", str(corpus.shards), "--out", str(root / "m2"),
              "--kind", "whitening"])  # fmt: skip
    assert exit_info.value.code == 2
    assert "--kind: must be one of procrustes, centring, centring+procrustes" in capsys.readouterr().err
    assert main(["fit-map", "--model", str(export), "--data", str(corpus.shards), "--out", str(root / "maps")]) == 2
    assert "--out" in capsys.readouterr().err and not (root / "m2").exists()


@pytest.mark.parametrize("name,command", [("fit-map.yaml", "fit_map"), ("eval-variants.yaml", "eval")])
def test_deploy_config_examples_parse(name, command):
    import importlib

    from tests._training import REPO

    parser = importlib.import_module(f"alignment.commands.{command}").parser()
    ns = parser.parse_args(["--config", str(REPO / "configs" / "deploy" / name)])
    assert ns.model == "runs/demo/export"
