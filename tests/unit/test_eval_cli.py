"""`align eval` end to end on a tiny random encoder: model loading, data readers, encoding, report, MTEB gate.

The encoder is the real 2-layer debug BERT with random weights and the real
word-level tokenizer (``alignment.synthetic``), saved with ``save_pretrained``.
A random encoder cannot translate, so behaviour is checked with planted
structure: identical strings embed identically (retrieval 1.0), STS gold that
follows string identity correlates, NaN weights give NaN embeddings.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import struct
from pathlib import Path

import pytest
import torch

from alignment.cli import main
from alignment.data.build import build_shards
from alignment.data.manifest import iter_shard_rows
from alignment.data.shards_write import ShardBuildConfig
from alignment.evaluate.datasets import EvalDataError
from alignment.evaluate.encode import EncodeConfig, encode_texts, length_order, resolve_prefix
from alignment.evaluate.encoder import OFFLINE_VARS, ModelLoadError, classify_spec, load_encoder
from alignment.evaluate.mteb_bridge import is_network_error, mteb_problems, sentence_transformer_from_spec
from alignment.evaluate.readers import load_eval_data, read_tsv
from alignment.model import ENCODER_META, DualEncoder
from alignment.synthetic import synthetic_rows, tiny_tokenizer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LANGS = ["en", "de", "fr", "es"]


def save_tiny_encoder(folder: Path, *, projection_dim: int | None = 16, card: dict | None = None) -> Path:
    """A saved tiny encoder plus its tokenizer; ``card`` entries are merged into alignment_encoder.json."""
    tokenizer = tiny_tokenizer(save_dir=folder)
    torch.manual_seed(0)
    model = DualEncoder.from_config(DualEncoder.tiny_config(len(tokenizer)), projection_dim=projection_dim)
    model.save_pretrained(folder)
    if card:
        meta = json.loads((folder / ENCODER_META).read_text())
        (folder / ENCODER_META).write_text(json.dumps({**meta, **card}))
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_encoder(model_dir)


@pytest.fixture(scope="module")
def rows():
    return synthetic_rows(60, LANGS, seed=1, missing_prob=0.2)


@pytest.fixture(scope="module")
def labelled_jsonl(tmp_path_factory, rows) -> Path:
    """Multi-way rows with a class label; ``de`` is a verbatim copy of ``en`` (planted perfect translations)."""
    out = []
    for i, row in enumerate(rows):
        texts = dict(row.texts, de=row.texts["en"])
        out.append({"id": row.id, "texts": texts, "label": ["neg", "pos"][i % 2]})
    return write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", out)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_png(path: Path) -> None:
    """A real PNG: signature, an IHDR with a sane size, and Pillow decodes all of it."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    assert 100 < width < 5000 and 100 < height < 5000
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.size == (width, height)


# --------------------------------------------------------------------------- end to end


def test_eval_end_to_end_writes_every_output(capsys, tmp_path, model_dir, labelled_jsonl):
    out = tmp_path / "report"
    code, stdout, stderr = run_cli(
        capsys, "eval", "--model", model_dir, "--data", labelled_jsonl, "--out", out,
        "--train_languages", "en,de", "--procrustes.fit_rows", "20", "--encode.quiet",
    )  # fmt: skip
    assert code == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    flat = metrics["metrics"]
    # de is a copy of en: identical strings give identical embeddings, so en<->de retrieval is exact.
    assert flat["retrieval_acc/en-de"] == 1.0 and flat["retrieval_acc/de-en"] == 1.0
    assert flat["retrieval_acc/fr-es"] < 0.5  # a random encoder does not translate
    assert {"xsim/mean", "lang_id_acc", "cos_gap", "transfer_acc/mean", "procrustes/retrieval_acc_after/mean"} <= set(
        flat
    )
    assert metrics["summary"]["num_rows"] == 60 and metrics["summary"]["training_languages"] == ["en", "de"]
    assert metrics["retrieval"]["pairs"][0]["group"] in ("seen", "mixed", "unseen")
    assert "align eval --model" in metrics["summary"]["command"]
    report = (out / "report.md").read_text()
    for section in ("## Summary", "## Retrieval by pair", "## Cross-lingual classification transfer",
                    "## Post-hoc Procrustes", "![projection](figures/projection.png)"):  # fmt: skip
        assert section in report
    for name in ("projection.png", "retrieval_heatmap.png", "per_language.png"):
        assert_png(out / "figures" / name)
    assert "| retrieval_acc/mean |" in stdout and "wrote" in stdout


def test_eval_matches_direct_encoding(capsys, tmp_path, model_dir, loaded, labelled_jsonl):
    """The CLI's numbers are those of encoding the same rows by hand and running the metric library."""
    from alignment.evaluate.embeddings import MultiWayEmbeddings
    from alignment.evaluate.suite import EvalConfig, evaluate_embeddings

    code, _, err = run_cli(capsys, "eval", "--model", model_dir, "--data", labelled_jsonl, "--out", tmp_path, "--encode.quiet")
    assert code == 0, err
    model, tokenizer, _ = loaded
    data = load_eval_data(labelled_jsonl)
    ids = [r.id for r in data.rows for _ in r.texts]
    langs = [lang for r in data.rows for lang in r.texts]
    vectors = encode_texts(model, tokenizer, [t for r in data.rows for t in r.texts.values()], EncodeConfig(quiet=True))
    expected = evaluate_embeddings(MultiWayEmbeddings(vectors, ids, langs), EvalConfig(), row_labels=data.labels)
    got = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert got["retrieval_acc/mean"] == pytest.approx(expected.retrieval.mean("accuracy"))
    assert got["transfer_acc/mean"] == pytest.approx(expected.transfer.mean_accuracy)


def test_eval_on_held_out_shards(capsys, tmp_path, model_dir, rows):
    manifest = build_shards(rows, ShardBuildConfig(out=tmp_path / "shards", split="rest,10,20", shuffle_buckets=2))
    out = tmp_path / "report"
    code, _, err = run_cli(
        capsys, "eval", "--model", model_dir, "--data", tmp_path / "shards", "--split", "test",
        "--languages", "en,de,fr", "--out", out, "--encode.quiet",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    test_rows = [row for shard in (tmp_path / "shards" / "test").glob("*.tar") for _, row in iter_shard_rows(shard)]
    assert len(test_rows) == manifest["splits"]["test"]["rows"] == 20
    # rows left with fewer than two of the selected languages translate nothing and are not evaluated
    assert summary["num_rows"] == sum(len({"en", "de", "fr"} & set(r.texts)) >= 2 for r in test_rows)
    assert summary["languages"] == ["de", "en", "fr"]


def test_eval_sts_tsv_spearman_and_projection(capsys, tmp_path, model_dir, rows):
    """Gold 5 for a sentence paired with itself, 0 with an unrelated one: cosine ranks them the same way."""
    lines = ["en\ten\tscore"]
    for i in range(30):
        a = rows[i].texts["en"]
        b, gold = (a, 5.0) if i % 2 else (rows[59 - i].texts["en"], 0.0)
        lines.append(f"{a}\t{b}\t{gold}")
    tsv = tmp_path / "sts-en.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "report"
    code, stdout, err = run_cli(capsys, "eval", "--model", model_dir, "--data", tsv, "--out", out, "--encode.quiet")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sts"][0]["name"] == "sts-en en-en" and metrics["sts"][0]["num_pairs"] == 30
    assert metrics["metrics"]["sts_spearman/sts-en en-en"] > 0.8
    assert "retrieval" not in metrics  # scored pairs are not translations
    assert_png(out / "figures" / "projection.png")
    assert "sts_spearman/sts-en en-en" in stdout


# --------------------------------------------------------------------------- NaN embeddings


def test_nan_embeddings_are_reported_not_scored(capsys, tmp_path, rows):
    """A diverged model (one NaN word vector): its sentences are dropped, counted, and named in the report."""
    folder = save_tiny_encoder(tmp_path / "broken")
    model, tokenizer, _ = load_encoder(folder)
    word = rows[0].texts["en"].split()[0]
    with torch.no_grad():
        model.backbone.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(word)] = float("nan")
    model.save_pretrained(folder)
    data = write_jsonl(tmp_path / "rows.jsonl", [{"id": r.id, **r.texts} for r in rows])
    hit = sum(word in r.texts["en"].split() for r in rows)
    out = tmp_path / "report"
    code, _, err = run_cli(capsys, "eval", "--model", folder, "--data", data, "--out", out, "--encode.quiet")
    assert code == 0, err
    assert f"{hit} embeddings are NaN/inf" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["invalid_embeddings"] == {"en": {"non_finite": hit, "zero_norm": 0}}
    assert metrics["metrics"]["invalid_embeddings"] == hit
    assert all(v is None or v == v for v in metrics["metrics"].values())  # no NaN leaked into a metric
    assert "## Invalid embeddings (dropped, not scored)" in (out / "report.md").read_text()


# --------------------------------------------------------------------------- bad input


def test_model_that_does_not_load_is_named(capsys, monkeypatch, tmp_path, labelled_jsonl):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "eval", "--model", tmp_path / "empty", "--data", labelled_jsonl, "--out", tmp_path)
    assert code == 1
    assert f"model '{tmp_path / 'empty'}' does not load" in err and "local folder" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # conftest sets it too; the message depends on it
    code, _, err = run_cli(capsys, "eval", "--model", "no-org/no-such-model", "--data", labelled_jsonl)
    assert code == 1
    assert "hub name" in err and "cannot be fetched offline" in err


def test_checkpoint_that_is_not_ours_is_named(capsys, tmp_path, labelled_jsonl):
    """A Lightning .ckpt without the encoder config (someone else's checkpoint) does not load: named, with why."""
    ckpt = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, ckpt)
    assert classify_spec(ckpt) == "lightning-checkpoint"
    code, _, err = run_cli(capsys, "eval", "--model", ckpt, "--data", labelled_jsonl, "--out", tmp_path / "o")
    assert code == 1
    assert f"model '{ckpt}' does not load: it looked like a Lightning checkpoint file" in err
    assert "not a multiway-align training checkpoint" in err


def test_tsv_with_a_missing_column_names_file_and_line(capsys, tmp_path, model_dir):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("id\ten\tde\nr1\tHello\tHallo\nr2\tGood night\n")
    code, _, err = run_cli(capsys, "eval", "--model", model_dir, "--data", tsv, "--out", tmp_path / "o")
    assert code == 1
    assert f"{tsv}:3: expected 3 tab-separated fields (id, en, de), got 2" in err
    assert not (tmp_path / "o" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("en\n", r"pairs.tsv:1: the header must name at least two language columns"),
        ("en\tde\tscore\nHi\tHallo\thigh\n", r"pairs.tsv:2: score 'high' is not a number"),
        ("en\tde\tfr\tscore\n", r"pairs.tsv:1: a TSV with a 'score' column .* exactly two text columns"),
        ("en\tkeyboard\n", r"pairs.tsv:1: header column 'keyboard' is not a language code"),
        ("en\tde\tlabel\nHi\tHallo\tx\nYes\tJa\t\n", r"pairs.tsv:3: label must be a non-empty"),
        ("id\ten\tde\nr1\tHi\tHallo\nr1\tYes\tJa\n", r"pairs.tsv:3: row id 'r1' repeats \(first at .*pairs.tsv:2\)"),
    ],
)
def test_tsv_errors_name_file_and_line(tmp_path, content, message):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text(content)
    with pytest.raises(EvalDataError, match=message):
        read_tsv(tsv)


def test_language_with_no_rows(capsys, tmp_path, model_dir, labelled_jsonl):
    code, _, err = run_cli(
        capsys, "eval", "--model", model_dir, "--data", labelled_jsonl, "--languages", "en,sw", "--out", tmp_path
    )
    assert code == 1
    assert "--languages sw has no rows" in err and "languages present: de, en, es, fr" in err


def test_jsonl_errors(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": 1, "en": "a", "de": "b", "label": "x"}\n{"id": 2, "en": "c", "de": "d"}\n')
    with pytest.raises(EvalDataError, match=r"x.jsonl:2: this row has no label but the rows before it do"):
        load_eval_data(path)
    path.write_text('{"en": "a", "de": "b", "fr": "c", "score": 3}\n')
    with pytest.raises(EvalDataError, match=r"x.jsonl:1: a row with a score is a scored pair and needs exactly two"):
        load_eval_data(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(EvalDataError, match=r"x.jsonl:1: expected a JSON object, got list"):
        load_eval_data(path)
    with pytest.raises(EvalDataError, match=r"data.csv: cannot tell the data format"):
        load_eval_data(tmp_path / "data.csv")
    rows_json = tmp_path / "rows.json"
    rows_json.write_text('{"en": "a", "de": "b"}\n')
    with pytest.raises(EvalDataError, match=r"rows.json: a .json --data must be a shard manifest"):
        load_eval_data(rows_json)


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [  # 2: a flag's own check (at parse time); 1: a check against the data
        (["--encode.batch_size", "0"], 2, "--encode.batch_size must be >= 1, got 0"),
        (["--procrustes.fit_rows", "500"], 1, "--procrustes.fit_rows (500) must be smaller than the 60 rows"),
        (["--train_languages", "en,??"], 2, "--train_languages: '??' is not a language code"),
        (["--pivot", "ja"], 1, "--pivot ja: the classification probe trains on the pivot"),
    ],
)
def test_flag_errors_name_the_flag(capsys, tmp_path, model_dir, labelled_jsonl, argv, status, message):
    code, _, err = run_cli(capsys, "eval", "--model", model_dir, "--data", labelled_jsonl, "--out", tmp_path, *argv)
    assert code == status and message in err


# --------------------------------------------------------------------------- encoding


def test_encoding_is_order_and_batch_independent(loaded, rows):
    model, tokenizer, _ = loaded
    texts = [r.texts["fr"] for r in rows if "fr" in r.texts][:40]
    base = encode_texts(model, tokenizer, texts, EncodeConfig(batch_size=7, quiet=True))  # (40, 16)
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))
    shuffled = encode_texts(model, tokenizer, [texts[i] for i in perm], EncodeConfig(batch_size=64, quiet=True))
    assert torch.allclose(shuffled, base[perm], atol=1e-5)
    # row i is sentence i encoded alone, without any padding
    with torch.inference_mode():
        one = tokenizer([texts[5]], return_tensors="pt")
        alone = model.encode(one["input_ids"], one["attention_mask"])  # (1, 16)
    assert torch.allclose(base[5], alone[0], atol=1e-5)
    assert torch.allclose(base.norm(dim=1), torch.ones(len(texts)), atol=1e-5)
    assert length_order([3, 5, 5, 1]) == [1, 2, 0, 3]


def _drain(fd: int) -> str:
    """Everything the terminal's other end has received so far."""
    import select

    chunks = []
    while select.select([fd], [], [], 0.2)[0]:
        chunks.append(os.read(fd, 65536))
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_only_on_a_terminal(loaded):
    model, tokenizer, _ = loaded
    master, slave = os.openpty()  # a real terminal device
    try:
        with os.fdopen(slave, "w") as tty:
            encode_texts(model, tokenizer, ["a b", "c"], EncodeConfig(quiet=False), desc="tty-run", stream=tty)
            tty.flush()
            shown = _drain(master)
            encode_texts(model, tokenizer, ["a b"], EncodeConfig(quiet=True), desc="quiet-run", stream=tty)
            tty.flush()
            quiet = _drain(master)
    finally:
        os.close(master)
    assert "tty-run" in shown and "2/2" in shown
    assert quiet == ""
    buffer = io.StringIO()  # not a terminal: a log file stays clean
    encode_texts(model, tokenizer, ["a"], EncodeConfig(), desc="log-run", stream=buffer)
    assert buffer.getvalue() == ""


def test_prefix_from_meta_and_sentence_transformers_bridge(tmp_path, rows):
    """Symmetric tasks take the E5 card's query prefix (E5's own advice; ``--prefix`` overrides);
    sentence-transformers embeds identically with the same prompt."""
    folder = save_tiny_encoder(tmp_path / "e5like", card={"query_prefix": "query: ", "passage_prefix": "passage: "})
    model, tokenizer, info = load_encoder(folder)
    assert (info.kind, info.passage_prefix, info.embedding_dim) == ("alignment-folder", "passage: ", 16)
    assert (resolve_prefix(info, None), resolve_prefix(info, "")) == ("query: ", "")
    texts = [r.texts["en"] for r in rows[:6]]
    ours = encode_texts(model, tokenizer, texts, EncodeConfig(quiet=True), prefix=info.passage_prefix)
    plain = encode_texts(model, tokenizer, texts, EncodeConfig(quiet=True), prefix="")
    assert not torch.allclose(ours, plain, atol=1e-4)  # "passage:" is a real token sequence ([UNK] here)
    st = sentence_transformer_from_spec(folder)
    theirs = st.encode(texts, prompt_name="passage", convert_to_tensor=True)  # (6, 16)
    assert torch.allclose(theirs.cpu(), ours, atol=1e-5)


# --------------------------------------------------------------------------- MTEB


def _clear_offline(monkeypatch):
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)


def test_mteb_not_installed_and_offline_messages(capsys, monkeypatch, model_dir):
    real = importlib.util.find_spec  # mteb is installed with [dev]: what a user without the extra sees, simulated
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mteb" else real(name, *a))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, stdout, err = run_cli(capsys, "eval", "--model", model_dir, "--mteb", "STS22.v2,Tatoeba")
    assert code == 1 and stdout == ""
    assert "MTEB is not installed" in err and "pip install 'multiway-align[mteb]'" in err
    assert "cannot be reached offline (HF_HUB_OFFLINE=1" in err
    _clear_offline(monkeypatch)
    problems = mteb_problems()
    assert len(problems) == 1 and "pip install 'multiway-align[mteb]'" in problems[0]
    assert mteb_problems({"HF_DATASETS_OFFLINE": "true"})[-1].startswith("MTEB downloads its task data")


def test_network_errors_are_recognised():
    import requests
    from huggingface_hub.errors import OfflineModeIsEnabled

    assert is_network_error(requests.ConnectionError("Max retries exceeded"))
    assert is_network_error(OfflineModeIsEnabled("offline"))
    try:
        try:
            raise ConnectionRefusedError(111, "refused")
        except ConnectionRefusedError as inner:
            raise RuntimeError("loading dataset mteb/sts22 failed") from inner
    except RuntimeError as outer:
        assert is_network_error(outer)
    assert not is_network_error(ValueError("task 'Nope' not found"))
    assert not is_network_error(KeyError("STS22"))


def test_load_errors_are_model_load_errors(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="looked like a Hugging Face hub name"):
        load_encoder("definitely-not/a-model-here")
