"""Export round trip: the exported folder gives the training model's embeddings.

A tiny module is fitted a few real optimiser steps on CPU, then exported from
the live model (``export_encoder``), from its checkpoint (``export_checkpoint``)
and through ``align export CKPT OUT``; ``SentenceTransformer(OUT).encode`` and
``DualEncoder.from_pretrained(OUT)`` must reproduce the trained embeddings.
"""

from __future__ import annotations

import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer

from alignment.cli import main
from alignment.export import encoder_from_checkpoint, export_checkpoint, export_encoder
from alignment.model import DualEncoder
from alignment.synthetic import synthetic_rows
from tests import _training as T

ATOL = 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return T.make_corpus(tmp_path_factory.mktemp("corpus"), rows=120)


@pytest.fixture(scope="module")
def texts():
    rows = synthetic_rows(6, T.LANGUAGES, seed=7)
    return [t for r in rows for t in r.texts.values()]


def _fit(corpus, root, **encoder):
    """A module trained 3 steps (weights moved off their init) and its checkpoint."""
    module = T.module(corpus, encoder=encoder)
    data = T.datamodule(corpus)
    trainer = T.trainer(root, max_steps=3)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 3
    ckpt = root / "trained.ckpt"
    trainer.save_checkpoint(ckpt)
    return module, data.tokenizer, ckpt


@pytest.fixture(scope="module")
def fitted(corpus, tmp_path_factory):
    return _fit(corpus, tmp_path_factory.mktemp("fit"))


@pytest.fixture(scope="module")
def fitted_projected(corpus, tmp_path_factory):
    return _fit(corpus, tmp_path_factory.mktemp("fitproj"), projection_dim=16, pooling="cls")


def _st_encode(folder, texts) -> torch.Tensor:
    model = SentenceTransformer(str(folder), device="cpu")
    return model.encode(texts, convert_to_tensor=True, batch_size=64)  # (N, D)


def test_fit_moved_the_weights(corpus, fitted):
    module, _, _ = fitted
    fresh = T.module(corpus)
    a = dict(fresh.encoder.named_parameters())
    moved = [n for n, p in module.encoder.named_parameters() if p.requires_grad and not torch.equal(p, a[n])]
    assert moved, "training changed no weight: the round trip would prove nothing"


@pytest.mark.parametrize("which", ["plain", "projected"])
def test_sentence_transformers_gives_training_embeddings(request, tmp_path, texts, which):
    module, tokenizer, _ = request.getfixturevalue("fitted" if which == "plain" else "fitted_projected")
    out = export_encoder(module.encoder, tmp_path / "export", tokenizer=tokenizer)
    expected = T.encode_texts(module.encoder, tokenizer, texts)  # (N, D)
    got = _st_encode(out, texts)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # the same folder through the project's own loader and AutoTokenizer
    reloaded = DualEncoder.from_pretrained(out)
    assert reloaded.pooling == module.encoder.pooling
    assert (reloaded.projection is None) == (which == "plain")
    torch.testing.assert_close(T.encode_texts(reloaded, AutoTokenizer.from_pretrained(str(out)), texts), expected,
                               atol=ATOL, rtol=0)


def test_projection_is_written_as_a_dense_module(fitted_projected, tmp_path):
    module, tokenizer, _ = fitted_projected
    out = export_encoder(module.encoder, tmp_path / "export", tokenizer=tokenizer)
    assert (out / "2_Dense" / "model.safetensors").is_file()
    st = SentenceTransformer(str(out), device="cpu")
    assert st.get_embedding_dimension() == 16


def test_checkpoint_export_equals_live_export(fitted, tmp_path, texts):
    module, tokenizer, ckpt = fitted
    live = export_encoder(module.encoder, tmp_path / "live", tokenizer=tokenizer)
    from_ckpt = export_checkpoint(ckpt, tmp_path / "ckpt")
    encoder, _, info = encoder_from_checkpoint(ckpt)
    assert info["global_step"] == 3
    for name, p in module.encoder.state_dict().items():
        torch.testing.assert_close(encoder.state_dict()[name], p, atol=0, rtol=0, msg=name)
    torch.testing.assert_close(_st_encode(from_ckpt, texts), _st_encode(live, texts), atol=ATOL, rtol=0)


def test_align_export_command(fitted, tmp_path, texts, capsys):
    module, tokenizer, ckpt = fitted
    out = tmp_path / "cli-export"
    assert main(["export", str(ckpt), str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    torch.testing.assert_close(_st_encode(out, texts), T.encode_texts(module.encoder, tokenizer, texts),
                               atol=ATOL, rtol=0)
    # an existing folder is kept unless --overwrite
    assert main(["export", str(ckpt), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(ckpt), str(out), "--overwrite", "--tokenizer", str(T.Path(tokenizer.name_or_path))]) == 0
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".cli-export")], "temporary folder left behind"


def test_align_export_bad_inputs(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.ckpt"), str(tmp_path / "out")]) == 2
    assert "missing.ckpt does not exist" in capsys.readouterr().err
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    assert main(["export", str(foreign), str(tmp_path / "out")]) == 2
    assert "not a multiway-align training checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
