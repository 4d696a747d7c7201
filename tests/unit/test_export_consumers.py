"""An export is what other tools load exactly: sentence-transformers without extra arguments, transformers'
Auto classes, a team's shared folder (modes), the Hub (a model card) -- from both export paths.

A tiny encoder starts from a local folder that records its origin (like ``align offline-encoder``'s E5),
trains 3 steps with E5's ``query: `` prefix and one validation pass, and is exported at the end of fit
(``ExportOnFitEnd``) and again from its checkpoint with ``align export``.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

from alignment.callbacks import ExportOnFitEnd
from alignment.cli import main
from alignment.model import ENCODER_META, DualEncoder
from alignment.synthetic import synthetic_rows
from tests import _training as T

ATOL = 1e-5
PREFIX = "query: "
ORIGIN = {"source": "intfloat/multilingual-e5-small", "query_prefix": PREFIX, "passage_prefix": "passage: "}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("consumers")
    corpus = T.make_corpus(root / "data", rows=120)
    base = root / "base"
    torch.manual_seed(0)
    start = DualEncoder.from_config(DualEncoder.tiny_config(corpus.vocab_size))
    start.card_extra = dict(ORIGIN)
    start.save_pretrained(base)
    ModelCard(f"---\n{ModelCardData(license='cc-by-4.0').to_yaml()}\n---\n# base\n").save(str(base / "README.md"))

    old_umask = os.umask(0o022)  # a shared-cluster umask: group and others may read
    try:
        module = T.module(corpus, encoder={"name_or_path": str(base)})
        data = T.datamodule(corpus, val_shards=str(corpus.shards), text_prefix=PREFIX)
        trainer = T.trainer(root, max_steps=3, limit_val_batches=2, val_check_interval=3, check_val_every_n_epoch=None,
                            callbacks=[ExportOnFitEnd(str(root / "fit-export"))])
        trainer.fit(module, datamodule=data)
        ckpt = root / "trained.ckpt"
        trainer.save_checkpoint(ckpt)
        assert main(["export", str(ckpt), str(root / "cli-export")]) == 0
    finally:
        os.umask(old_umask)
    texts = [t for r in synthetic_rows(6, T.LANGUAGES, seed=7) for t in r.texts.values()]
    expected = T.encode_texts(module.encoder, data.tokenizer, [PREFIX + t for t in texts])  # what training computes
    return {"fit": root / "fit-export", "cli": root / "cli-export"}, module, corpus, texts, expected


@pytest.mark.parametrize("which", ["fit", "cli"])
def test_plain_encode_gives_the_training_embeddings(exported, which):
    folders, _, _, texts, expected = exported
    model = SentenceTransformer(str(folders[which]), device="cpu")
    for encode in (model.encode, model.encode_query, model.encode_document):  # no prompt_name anywhere
        got = encode(texts, convert_to_tensor=True, batch_size=64)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=encode.__name__)


@pytest.mark.parametrize("which", ["fit", "cli"])
def test_auto_classes_load_it(exported, which):
    folders, _, _, texts, expected = exported
    tokenizer = AutoTokenizer.from_pretrained(str(folders[which]))
    model = AutoModel.from_pretrained(str(folders[which])).eval()
    enc = tokenizer([PREFIX + t for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # modules.json: mean, normalise
    torch.testing.assert_close(emb, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("which", ["fit", "cli"])
def test_modes_follow_the_umask(exported, which):
    folder = exported[0][which]
    wrong = [f"{p.relative_to(folder.parent)} {stat.filemode(p.stat().st_mode)}"
             for p in [folder, *folder.rglob("*")]
             if stat.S_IMODE(p.stat().st_mode) != (0o755 if p.is_dir() else 0o644)]
    assert not wrong, wrong


@pytest.mark.parametrize("which", ["fit", "cli"])
def test_model_card_and_source_information(exported, which):
    folders, module, corpus, _, _ = exported
    card = ModelCard.load(str(folders[which] / "README.md"))
    assert card.data.base_model == ORIGIN["source"]
    assert card.data.license == "cc-by-4.0"  # the base folder's own card
    assert card.data.language == sorted(T.LANGUAGES) and "objective-multi_positive" in card.data.tags
    assert card.data.library_name == "sentence-transformers"
    manifest = hashlib.sha256((corpus.shards / "manifest.json").read_bytes()).hexdigest()
    assert f"`{manifest}`" in card.text and "| optimiser steps | 3 |" in card.text
    assert module.last_eval and all(f"| `{k}` | {v:.4f} |" in card.text for k, v in module.last_eval.items())
    meta = json.loads((folders[which] / ENCODER_META).read_text())
    assert {k: meta.get(k) for k in ORIGIN} == ORIGIN  # the origin and prefixes survive both export paths
