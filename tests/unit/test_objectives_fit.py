"""The extra objectives along the user's path: ``align fit`` with all four terms on (tiny model, 3 steps),
each term in the run's CSV log and finite; the export records the Matryoshka widths, ``align eval --dims``
reports retrieval at each width, and ``SentenceTransformer(export, truncate_dim=d).encode`` -- the
export's ordinary consumer -- gives the same retrieval numbers.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignment.cli import main
from tests import _training as T

CSV_ONLY = """\
trainer:
  logger:
    - class_path: alignment.loggers.RunCSVLogger
      init_args: {name: csv}
"""
TERMS = ("adversarial_loss", "adv_accuracy", "adv_lambda", "neighbourhood_loss", "neighbourhood_kl", "distill_loss",
         "distill_cos", "matryoshka_loss", "matryoshka_8", "matryoshka_16_acc", "contrastive_loss")
DIMS = (8, 16)


def _teacher(folder, vocab_size: int) -> str:
    """A tiny encoder folder with its own (saved) tokenizer: what ``--model.distill.teacher`` loads."""
    from alignment.model import DualEncoder
    from alignment.synthetic import tiny_tokenizer

    torch.manual_seed(123)
    DualEncoder.from_config(DualEncoder.tiny_config(vocab_size)).save_pretrained(folder)
    tiny_tokenizer(save_dir=folder)
    return str(folder)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectives")
    corpus = T.make_corpus(root / "data", rows=64, rows_per_shard=32)
    (root / "csv.yaml").write_text(CSV_ONLY)
    teacher = _teacher(root / "teacher", corpus.vocab_size)
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    try:
        code = main(["fit", "--config", str(T.DEBUG_YAML), "--config", "csv.yaml",
                     "--data.train_shards", str(corpus.shards), "--data.tokenizer", str(corpus.tokenizer),
                     "--model.encoder.vocab_size", str(corpus.vocab_size), "--data.batch_size", "8",
                     "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
                     "--checkpoint.every_n_train_steps", "100",
                     "--model.adversarial.weight", "0.5", "--model.adversarial.ramp", "constant",
                     "--model.neighbourhood.weight", "1.0", "--model.distill.teacher", teacher,
                     "--model.distill.contrastive_weight", "0.5", "--model.matryoshka.dims", "[8,16]"])
    finally:
        mp.undo()
    assert code == 0
    return root, corpus


def test_every_term_is_logged_finite_on_every_step(fitted):
    root, _ = fitted
    rows = [r for r in T.csv_metrics(next((root / "runs" / "debug").glob("csv/version_*/metrics.csv")))
            if "train/contrastive_loss" in r]
    assert len(rows) == 3
    for row in rows:
        for term in TERMS:
            assert math.isfinite(row[f"train/{term}"]), (term, row)
        assert 0.0 <= row["train/adv_accuracy"] <= 1.0 and row["train/adv_lambda"] == 1.0
    ckpt = torch.load(root / "runs" / "debug" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert any(k.startswith("objectives.discriminator.") for k in ckpt["state_dict"])  # trained and checkpointed
    assert ckpt["optimizer_states"][0]["state"], "the optimiser holds no state"
    n_params = sum(len(g["params"]) for g in ckpt["optimizer_states"][0]["param_groups"])
    trainable = sum(1 for k in ckpt["state_dict"] if not k.startswith("encoder.backbone.pooler."))
    assert n_params == trainable  # the discriminator's 4 tensors are optimised with the encoder's


def test_eval_dims_matches_sentence_transformers_truncate_dim(fitted, capsys):
    from sentence_transformers import SentenceTransformer

    from alignment.evaluate.embeddings import MultiWayEmbeddings
    from alignment.evaluate.retrieval import RetrievalConfig, evaluate_retrieval

    root, _ = fitted
    export = root / "runs" / "debug" / "export"
    assert json.loads((export / "alignment_encoder.json").read_text())["matryoshka_dims"] == list(DIMS)
    data = root / "data" / "rows.jsonl"
    out = root / "eval"
    code = main(["eval", "--model", str(export), "--data", str(data), "--max_rows", "40", "--dims", "8,16",
                 "--diagnostics", "false", "--hubness_k", "0", "--out", str(out), "--encode.quiet", "true"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert "dim8/retrieval_acc/mean" in capsys.readouterr().out  # in the printed summary table
    rows = [json.loads(line) for line in data.read_text().splitlines()][:40]
    texts = [(r["id"], lang, text) for r in rows for lang, text in sorted(r["texts"].items())]
    for dim in DIMS:
        st = SentenceTransformer(str(export), device="cpu", truncate_dim=dim)
        vectors = st.encode([t for _, _, t in texts], convert_to_tensor=True, normalize_embeddings=False)
        assert vectors.shape == (len(texts), dim)
        emb = MultiWayEmbeddings(vectors.float(), [i for i, _, _ in texts], [lang for _, lang, _ in texts])
        table = evaluate_retrieval(emb, RetrievalConfig())
        assert metrics[f"dim{dim}/retrieval_acc/mean"] == pytest.approx(table.mean("accuracy"), abs=1e-6)
        assert metrics[f"dim{dim}/xsim/mean"] == pytest.approx(table.mean("xsim_error"), abs=1e-6)
    assert "retrieval_acc/mean" in metrics  # the full width as before


def test_align_export_of_the_checkpoint_leaves_the_discriminator_out(fitted):
    """The checkpoint holds the discriminator; ``align export`` keeps the encoder only (and the Matryoshka
    widths), and ``SentenceTransformer`` on it embeds as the export written at the end of fit."""
    from sentence_transformers import SentenceTransformer

    root, _ = fitted
    out = root / "export-from-ckpt"
    assert main(["export", str(root / "runs" / "debug" / "checkpoints" / "last.ckpt"), str(out)]) == 0
    texts = ["en_w1 en_w2 en_w3", "de_w4 de_w5", "fr_w7 fr_w8"]
    again = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
    at_fit_end = SentenceTransformer(str(root / "runs" / "debug" / "export"), device="cpu").encode(
        texts, convert_to_tensor=True)
    torch.testing.assert_close(again, at_fit_end, rtol=1e-5, atol=1e-6)
    assert not any("discriminator" in p.name for p in out.rglob("*"))
    assert json.loads((out / "alignment_encoder.json").read_text())["matryoshka_dims"] == list(DIMS)  # via the run record
