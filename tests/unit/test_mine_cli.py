"""`align mine SRC TGT` end to end: planted pairs, line numbers, gold and paired modes, checkpoints, bad input.

The encoder is the tiny random debug BERT (``alignment.synthetic``). It cannot
translate, so the planted pairs are verbatim copies: identical strings embed
identically (cosine 1), and the ratio margin of such a pair is at least 1.
"""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignment.cli import main
from alignment.evaluate.encode import EncodeConfig, encode_texts
from alignment.evaluate.encoder import load_encoder
from alignment.evaluate.mining import MiningConfig, mine
from alignment.model import DualEncoder
from alignment.synthetic import synthetic_rows, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


def save_tiny_encoder(folder: Path, seed: int = 0) -> Path:
    tokenizer = tiny_tokenizer(save_dir=folder)
    torch.manual_seed(seed)
    DualEncoder.from_config(DualEncoder.tiny_config(len(tokenizer)), projection_dim=16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    return [r.texts["en"] for r in synthetic_rows(260, ["en", "de"], seed=3)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sentences):
    """SRC: 200 sentences with blank lines between some; TGT: 150 of them shuffled among 60 distractors."""
    root = tmp_path_factory.mktemp("mine")
    src_lines = []
    for i, text in enumerate(sentences[:200]):
        src_lines.append(text)
        if i % 40 == 0:
            src_lines.append("")  # blank lines are skipped but keep the numbering
    tgt_lines = sentences[:150] + sentences[200:260]
    random.Random(0).shuffle(tgt_lines)
    (root / "src.txt").write_text("\n".join(src_lines) + "\n", encoding="utf-8")
    (root / "tgt.txt").write_text("\n".join(tgt_lines) + "\n", encoding="utf-8")
    return root / "src.txt", root / "tgt.txt"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_pairs(path: Path) -> tuple[list[str], list[tuple[float, int, int, str, str]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for line in lines[1:]:
        score, s, t, a, b = line.split("\t")
        rows.append((float(score), int(s), int(t), a, b))
    return lines[0].split("\t"), rows


def file_lines(path: Path) -> dict[int, str]:
    return {n: text for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)}


# --------------------------------------------------------------------------- mining


def test_planted_pairs_are_mined_with_their_line_numbers(capsys, tmp_path, model_dir, corpus):
    src, tgt = corpus
    out = tmp_path / "pairs.tsv"
    code, stdout, err = run_cli(capsys, "mine", src, tgt, "--model", model_dir, "--out", out, "--mining.threshold", "1.0",
                                "--encode.quiet")  # fmt: skip
    assert code == 0, err
    header, rows = read_pairs(out)
    assert header == ["score", "src_line", "tgt_line", "src_text", "tgt_text"]
    src_by_line, tgt_by_line = file_lines(src), file_lines(tgt)
    for score, s, t, a, b in rows:
        assert src_by_line[s] == a and tgt_by_line[t] == b  # line numbers point at the written texts
        assert score >= 1.0
    assert [r[0] for r in rows] == sorted((r[0] for r in rows), reverse=True)
    planted = {(s, t) for s, a in src_by_line.items() for t, b in tgt_by_line.items() if a and a == b}
    assert len(planted) == 150 and planted <= {(r[1], r[2]) for r in rows}
    assert len({r[1] for r in rows}) == len(rows) == len({r[2] for r in rows})  # max-score is one-to-one
    assert "| source sentences | 200 |" in stdout and "| k-NN backend | exact |" in stdout


def test_cli_output_equals_the_mining_library(capsys, tmp_path, model_dir, corpus):
    """Same pairs and scores as encoding the non-blank lines by hand and calling ``mine``."""
    src, tgt = corpus
    out = tmp_path / "pairs.tsv"
    code, _, err = run_cli(capsys, "mine", src, tgt, "--model", model_dir, "--out", out, "--mining.threshold", "1.01",
                           "--mining.mode", "intersection", "--mining.k", "3", "--encode.quiet")  # fmt: skip
    assert code == 0, err
    model, tokenizer, _ = load_encoder(model_dir)
    src_items = [(n, t) for n, t in file_lines(src).items() if t.strip()]
    tgt_items = [(n, t) for n, t in file_lines(tgt).items() if t.strip()]
    cfg = EncodeConfig(quiet=True)
    x = encode_texts(model, tokenizer, [t for _, t in src_items], cfg)
    y = encode_texts(model, tokenizer, [t for _, t in tgt_items], cfg)
    expected = mine(x, y, MiningConfig(mode="intersection", k=3, threshold=1.01))
    _, rows = read_pairs(out)
    assert [(r[1], r[2]) for r in rows] == [(src_items[s][0], tgt_items[t][0]) for s, t, _ in expected.as_list()]
    assert [r[0] for r in rows] == pytest.approx(expected.scores.tolist(), abs=1e-6)


def test_gold_mode_reports_precision_recall(capsys, tmp_path, model_dir, sentences):
    src, tgt = tmp_path / "a.txt", tmp_path / "b.txt"
    src.write_text("\n".join(sentences[:80]) + "\n")
    tgt.write_text("\n".join(sentences[:80]) + "\n")
    code, stdout, err = run_cli(capsys, "mine", src, tgt, "--model", model_dir, "--out", tmp_path / "p.tsv",
                                "--gold", "--mining.threshold", "1.0", "--encode.quiet")  # fmt: skip
    assert code == 0, err
    assert "| gold correct | 80 |" in stdout and "| gold recall | 1.0000 |" in stdout
    assert "| gold precision | 1.0000 |" in stdout


def test_paired_mode_scores_equal_mined_scores(capsys, tmp_path, model_dir, sentences):
    """``--paired`` scores line i with line i using the same neighbourhoods as mining: one scale, equal numbers."""
    src, tgt = tmp_path / "a.txt", tmp_path / "b.txt"
    src.write_text("\n".join(sentences[:60]) + "\n")
    tgt.write_text("\n".join(sentences[:30] + sentences[200:230]) + "\n")  # second half: wrong pairs
    code, _, err = run_cli(capsys, "mine", src, tgt, "--model", model_dir, "--out", tmp_path / "paired.tsv",
                           "--paired", "--mining.threshold", "1.0", "--encode.quiet")  # fmt: skip
    assert code == 0, err
    _, paired = read_pairs(tmp_path / "paired.tsv")
    assert all(s == t for _, s, t, _, _ in paired)
    assert {s for _, s, _, _, _ in paired} >= set(range(1, 31))  # every true pair passes the threshold
    code, _, err = run_cli(capsys, "mine", src, tgt, "--model", model_dir, "--out", tmp_path / "mined.tsv",
                           "--gold", "--mining.threshold", "1.0", "--encode.quiet")  # fmt: skip
    assert code == 0, err
    _, mined = read_pairs(tmp_path / "mined.tsv")
    mined_scores = {(s, t): score for score, s, t, _, _ in mined}
    for score, s, t, _, _ in paired:
        if (s, t) in mined_scores:
            assert score == pytest.approx(mined_scores[(s, t)], abs=2e-6)  # TSV keeps 6 decimals


def test_checkpoint_mines_like_its_export(capsys, tmp_path, sentences):
    """A Lightning checkpoint given as --model embeds exactly as the folder `align export` makes of it."""
    from tests import _training as T

    corpus = T.make_corpus(tmp_path / "corpus", rows=60)
    trainer = T.trainer(tmp_path / "fit", max_steps=1)
    trainer.fit(T.module(corpus), datamodule=T.datamodule(corpus))
    ckpt = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(ckpt)
    assert main(["export", str(ckpt), str(tmp_path / "export")]) == 0
    src, tgt = tmp_path / "a.txt", tmp_path / "b.txt"
    src.write_text("\n".join(sentences[:40]) + "\n")
    tgt.write_text("\n".join(sentences[20:60]) + "\n")
    outputs = []
    for model in (ckpt, tmp_path / "export"):
        out = tmp_path / f"{Path(model).name}.tsv"
        code, _, err = run_cli(capsys, "mine", src, tgt, "--model", model, "--out", out, "--mining.threshold", "1.0",
                               "--encode.quiet")  # fmt: skip
        assert code == 0, err
        outputs.append(read_pairs(out)[1])
    assert [r[1:] for r in outputs[0]] == [r[1:] for r in outputs[1]] and len(outputs[0]) >= 20
    assert [r[0] for r in outputs[0]] == pytest.approx([r[0] for r in outputs[1]], abs=1e-5)


def test_faiss_backend(capsys, tmp_path, model_dir, corpus):
    src, tgt = corpus
    argv = ["mine", src, tgt, "--model", model_dir, "--mining.threshold", "1.0", "--encode.quiet"]
    if importlib.util.find_spec("faiss") is None:
        code, _, err = run_cli(capsys, *argv, "--out", tmp_path / "f.tsv", "--mining.backend", "faiss")
        assert code == 1 and "faiss is not installed (pip install faiss-cpu)" in err
        assert not (tmp_path / "f.tsv").exists()
        return
    for backend in ("exact", "faiss"):
        assert run_cli(capsys, *argv, "--out", tmp_path / f"{backend}.tsv", "--mining.backend", backend)[0] == 0
    exact, faiss = read_pairs(tmp_path / "exact.tsv")[1], read_pairs(tmp_path / "faiss.tsv")[1]
    assert [r[1:3] for r in exact] == [r[1:3] for r in faiss]


# --------------------------------------------------------------------------- bad input and reporting


@pytest.mark.parametrize("flag", ["--gold", "--paired"])
def test_mismatched_line_counts_name_both_files(capsys, tmp_path, model_dir, sentences, flag):
    src, tgt = tmp_path / "a.txt", tmp_path / "b.txt"
    src.write_text("\n".join(sentences[:10]) + "\n")
    tgt.write_text("\n".join(sentences[:9]) + "\n")
    code, _, err = run_cli(capsys, "mine", src, tgt, "--model", model_dir, "--out", tmp_path / "p.tsv", flag)
    assert code == 1
    assert f"{flag} needs line-aligned files, but {src} has 10 lines and {tgt} has 9" in err
    assert not (tmp_path / "p.tsv").exists()


def test_bad_inputs_and_flags(capsys, tmp_path, model_dir, sentences):
    good = tmp_path / "good.txt"
    good.write_text("\n".join(sentences[:5]) + "\n")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"fine line\ncaf\xe9 au lait\n")
    cases = [
        ([good, bad], 1, "latin1.txt:2: not valid UTF-8"),
        ([good, tmp_path / "missing.txt"], 1, "missing.txt: no such file"),
        ([good, good, "--mining.margin", "absolute", "--mining.threshold", "1.06"], 2,
         "--mining.threshold 1.06 can never be reached"),
        ([good, good, "--mining.k", "0"], 2, "--mining.k must be >= 1, got 0"),
        ([good, good, "--encode.batch_size", "0"], 2, "--encode.batch_size must be >= 1, got 0"),
    ]  # 2: a flag's own check (at parse time); 1: the inputs
    for args, status, message in cases:
        code, _, err = run_cli(capsys, "mine", *args, "--model", model_dir, "--out", tmp_path / "p.tsv")
        assert code == status and message in err, (args, err)
    (tmp_path / "empty.txt").write_text("\n\n")
    code, _, err = run_cli(capsys, "mine", good, tmp_path / "empty.txt", "--model", model_dir, "--out", tmp_path / "o")
    assert code == 1 and "empty.txt: no sentences to mine" in err
    code, _, err = run_cli(capsys, "mine", good, good, "--model", tmp_path / "nope", "--out", tmp_path / "p.tsv")
    assert code == 1 and f"model '{tmp_path / 'nope'}' does not load" in err


def test_nan_embeddings_are_reported_by_line_and_never_paired(capsys, tmp_path, sentences):
    folder = save_tiny_encoder(tmp_path / "broken")
    model, tokenizer, _ = load_encoder(folder)
    word = sentences[3].split()[0]
    with torch.no_grad():
        model.backbone.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(word)] = float("nan")
    model.save_pretrained(folder)
    src, tgt = tmp_path / "a.txt", tmp_path / "b.txt"
    src.write_text("\n".join(sentences[:50]) + "\n")
    tgt.write_text("\n".join(reversed(sentences[:50])) + "\n")
    broken = [n for n, text in enumerate(sentences[:50], 1) if word in text.split()]
    code, _, err = run_cli(capsys, "mine", src, tgt, "--model", folder, "--out", tmp_path / "p.tsv", "--mining.threshold",
                           "1.0", "--encode.quiet")  # fmt: skip
    assert code == 0, err
    assert f"{src}: {len(broken)} NaN/inf embeddings (lines {', '.join(map(str, broken[:5]))}" in err
    _, rows = read_pairs(tmp_path / "p.tsv")
    assert rows and not ({r[1] for r in rows} & set(broken))
    assert all(r[3] == r[4] for r in rows)  # the other planted copies are still found


def test_tabs_in_text_do_not_break_the_tsv(capsys, tmp_path, model_dir, sentences):
    src, tgt = tmp_path / "a.txt", tmp_path / "b.txt"
    lines = [s.replace(" ", "\t", 1) for s in sentences[:20]]
    src.write_text("\n".join(lines) + "\n")
    tgt.write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(capsys, "mine", src, tgt, "--model", model_dir, "--out", tmp_path / "p.tsv",
                           "--mining.threshold", "1.0", "--encode.quiet")  # fmt: skip
    assert code == 0, err
    _, rows = read_pairs(tmp_path / "p.tsv")  # would raise on a sixth field
    assert rows[0][3] == lines[rows[0][1] - 1].replace("\t", " ")


def test_align_mine_as_a_subprocess(tmp_path, model_dir, corpus):
    """The real entry point, not a terminal: a summary on stdout, no progress bar in the log."""
    src, tgt = corpus
    out = tmp_path / "pairs.tsv"
    proc = subprocess.run(
        [sys.executable, "-m", "alignment.cli", "mine", str(src), str(tgt), "--model", str(model_dir),
         "--out", str(out), "--mining.threshold", "1.02"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "| pairs written |" in proc.stdout and f"to {out}" in proc.stdout
    assert "src.txt:" not in proc.stderr and "sent/s" not in proc.stderr  # no tqdm bar in a log
    assert out.read_text().count("\n") >= 2
