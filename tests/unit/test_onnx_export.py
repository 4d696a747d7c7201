"""ONNX / int8 exports and the variants table along the user's path.

A tiny encoder trains 2 steps; ``align export CKPT OUT --format onnx`` writes ``onnx/model.onnx`` and
``onnx/model_qint8.onnx``; each is loaded with ``onnxruntime.InferenceSession`` and compared with the training
model's embeddings: fp32 cosine >= 1 - 1e-4 (measured: 1 - 1e-7) and max abs difference <= 1e-4; int8 cosine
>= 0.98 (measured on this tiny model: >= 0.999). ``align export CKPT OUT --maps DIR`` carries maps fitted on the
export of the same checkpoint. ``align eval --variants`` writes the quality / size / speed table.
(``SentenceTransformer(OUT, backend="onnx")`` reads the same ``onnx/model.onnx`` but needs ``optimum``, which
this project does not install; the test runs what that backend does instead: the folder's own sentence-transformers
modules after ``Transformer`` on the graph's ``last_hidden_state``, max abs difference <= 1e-4.)
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer

from alignment.cli import main
from alignment.deploy.maps import LanguageMaps
from alignment.synthetic import synthetic_rows
from tests import _training as T


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    corpus = T.make_corpus(root / "data", rows=160, rows_per_shard=40)
    module = T.module(corpus)
    data = T.datamodule(corpus)
    trainer = T.trainer(root, max_steps=2)
    trainer.fit(module, datamodule=data)
    ckpt = root / "trained.ckpt"
    trainer.save_checkpoint(ckpt)
    assert main(["export", str(ckpt), str(root / "onnx-export"), "--format", "onnx"]) == 0
    return root, corpus, module.encoder.eval(), ckpt


def _batch(corpus):
    tok = AutoTokenizer.from_pretrained(str(corpus.tokenizer))
    texts = [t for r in synthetic_rows(8, T.LANGUAGES, seed=3) for t in r.texts.values()]
    return tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")


@pytest.mark.parametrize("name,min_cos", [("model.onnx", 1 - 1e-4), ("model_qint8.onnx", 0.98)])
def test_onnx_graphs_match_the_training_model(trained, name, min_cos):
    root, corpus, encoder, _ = trained
    batch = _batch(corpus)
    with torch.no_grad():
        expected = encoder.encode(batch["input_ids"], batch["attention_mask"]).numpy()
    session = ort.InferenceSession(str(root / "onnx-export" / "onnx" / name), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "sentence_embedding"]
    (got,) = session.run(["sentence_embedding"], {k: batch[k].numpy() for k in ("input_ids", "attention_mask")})
    cos = (got * expected).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert cos.min() >= min_cos, cos.min()
    if name == "model.onnx":
        assert np.abs(got - expected).max() <= 1e-4
        # dynamic axes: another batch size and length than the trace
        (one,) = session.run(["sentence_embedding"], {k: batch[k][:1, :5].numpy() for k in ("input_ids", "attention_mask")})
        with torch.no_grad():
            ref = encoder.encode(batch["input_ids"][:1, :5], batch["attention_mask"][:1, :5]).numpy()
        assert np.abs(one - ref).max() <= 1e-4
    if name == "model.onnx":  # what sentence-transformers' ONNX backend does: its own modules on last_hidden_state
        (hidden,) = session.run(["last_hidden_state"], {k: batch[k].numpy() for k in ("input_ids", "attention_mask")})
        st = SentenceTransformer(str(root / "onnx-export"), device="cpu")
        features = {"token_embeddings": torch.from_numpy(hidden), "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            for module in list(st)[1:]:
                features = module(features)
        assert np.abs(features["sentence_embedding"].numpy() - expected).max() <= 1e-4
    if name == "model_qint8.onnx":
        fp32 = root / "onnx-export" / "onnx" / "model.onnx"
        assert (root / "onnx-export" / "onnx" / name).stat().st_size < fp32.stat().st_size


def test_export_with_maps_from_the_checkpoint(trained):
    root, corpus, _, ckpt = trained
    assert main(["fit-map", "--model", str(root / "onnx-export"), "--data", str(corpus.shards), "--split", "train",
                 "--calibration_rows", "80", "--kind", "procrustes", "--out", str(root / "maps"),
                 "--encode.quiet", "true"]) == 0  # fmt: skip
    assert main(["export", str(ckpt), str(root / "maps-export"), "--maps", str(root / "maps")]) == 0
    maps = LanguageMaps.load(root / "maps")
    texts = [r.texts["fr"] for r in synthetic_rows(8, T.LANGUAGES, seed=3) if "fr" in r.texts]
    plain = torch.as_tensor(SentenceTransformer(str(root / "onnx-export"), device="cpu").encode(texts))
    got = SentenceTransformer(str(root / "maps-export"), device="cpu").encode(texts, task="fr", convert_to_tensor=True)
    assert torch.allclose(got.cpu(), maps.apply_tensor(plain, "fr"), atol=1e-5)


def test_eval_variants_table(trained):
    root, corpus, _, _ = trained
    out = root / "eval"
    assert main(["eval", "--model", str(root / "onnx-export"), "--data", str(corpus.shards), "--split", "test",
                 "--variants", "int8,onnx,onnx-int8,binary,emb-int8", "--out", str(out), "--hubness_k", "0",
                 "--diagnostics", "false", "--train_languages", "en,de,fr,es", "--encode.quiet", "true"]) == 0  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    rows = {row["variant"]: row for row in metrics["variants"]}
    assert list(rows) == ["fp32", "int8", "onnx", "onnx-int8", "binary", "emb-int8"]
    fp32 = rows["fp32"]
    assert fp32["retrieval_acc"] == pytest.approx(metrics["retrieval"]["groups"]["seen"]["accuracy"], abs=1e-9)
    assert rows["onnx"]["retrieval_acc"] == pytest.approx(fp32["retrieval_acc"], abs=1e-9)
    assert rows["onnx"]["cosine_to_fp32"] >= 1 - 1e-5
    assert rows["int8"]["cosine_to_fp32"] >= 0.98 and rows["onnx-int8"]["cosine_to_fp32"] >= 0.98
    assert rows["onnx-int8"]["model_mb"] < rows["onnx"]["model_mb"]
    assert rows["binary"]["bytes_per_embedding"] * 32 == fp32["bytes_per_embedding"]
    assert all(row["sentences_per_s"] > 0 for row in rows.values())
    assert "Deployment variants" in (out / "report.md").read_text()


def test_bad_variant_names_the_flag(trained, capsys):
    root, corpus, _, _ = trained
    assert main(["eval", "--model", str(root / "onnx-export"), "--data", str(corpus.shards), "--variants", "fp16"]) == 2
    assert "--variants: must be a comma-separated list of fp32, int8" in capsys.readouterr().err
