"""Seen / unseen grouping of ``align eval``: the training languages come from what the export or checkpoint
recorded, the pivot counts as trained, and a guess is said out loud.

A tiny encoder is trained on en + de (en the pivot) and exported at the end of fit; it is evaluated on the
held-out rows of en, de, fr, es: pairs among {en, de} are seen, fr-es / es-fr unseen, the rest mixed.
"""

from __future__ import annotations

import json

import pytest

from alignment.callbacks import ExportOnFitEnd
from alignment.cli import main
from alignment.model import DualEncoder
from tests import _training as T


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("grouping")
    corpus = T.make_corpus(root / "data", rows=160)
    module = T.module(corpus)
    data = T.datamodule(corpus, languages=["en", "de"])
    trainer = T.trainer(root, max_steps=2, callbacks=[ExportOnFitEnd(str(root / "export"))])
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(root / "trained.ckpt")
    return root, corpus


def _eval(capsys, model, corpus, out, *extra):
    rc = main(["eval", "--model", str(model), "--data", str(corpus.shards), "--split", "test", "--languages",
               "en,de,fr,es", "--encode.quiet", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 0, err
    return json.loads((out / "metrics.json").read_text()), err


def _groups(metrics):
    m = metrics["metrics"]
    pairs = {k.split("/")[1]: v for k, v in m.items() if k.startswith("retrieval_acc/") and "-" in k.split("/")[1]
             and k.count("/") == 1}
    return m, pairs


@pytest.mark.parametrize("which", ["export", "trained.ckpt"])
def test_recorded_languages_with_the_pivot_are_the_seen_group(capsys, trained, which):
    root, corpus = trained
    metrics, err = _eval(capsys, root / which, corpus, root / f"eval-{which}")
    assert "align eval: training languages from" in err
    assert sorted(metrics["summary"]["training_languages"]) == ["de", "en"]
    m, pairs = _groups(metrics)
    assert m["retrieval_acc/seen_mean"] == pytest.approx((pairs["en-de"] + pairs["de-en"]) / 2)
    assert m["retrieval_acc/unseen_mean"] == pytest.approx((pairs["fr-es"] + pairs["es-fr"]) / 2)


def test_given_languages_count_the_pivot_as_trained(capsys, trained):
    root, corpus = trained
    metrics, err = _eval(capsys, root / "export", corpus, root / "eval-given", "--train_languages", "de")
    assert "counting the pivot en as a training language" in err
    m, pairs = _groups(metrics)
    assert m["retrieval_acc/unseen_mean"] == pytest.approx((pairs["fr-es"] + pairs["es-fr"]) / 2)
    _, err = _eval(capsys, root / "export", corpus, root / "eval-other", "--train_languages", "de,fr")
    assert "differs from the languages recorded in" in err


def test_a_model_without_a_record_is_not_split_and_says_so(capsys, trained, tmp_path):
    root, corpus = trained
    plain = DualEncoder.from_pretrained(root / "export")
    plain.save_pretrained(tmp_path / "plain")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(corpus.tokenizer)).save_pretrained(str(tmp_path / "plain"))
    metrics, err = _eval(capsys, tmp_path / "plain", corpus, tmp_path / "eval")
    assert "records no training languages" in err and "--train_languages" in err
    assert metrics["summary"]["training_languages"] is None
