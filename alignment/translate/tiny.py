"""Tiny random-weight seq2seq translators of every supported family, built from configs (no downloads).

Debug assets, like :mod:`alignment.synthetic`: used by the tests, the benchmark
(``benchmarks/translate_speed.py``) and smoke runs of ``align translate``.

Each builder writes a folder that ``AutoModelForSeq2SeqLM`` / ``AutoTokenizer``
load exactly like a hub checkpoint: a one-layer model of the family's own
architecture (M2M100 for M2M100 and NLLB, MBart for mBART-50, Marian) with
random weights, and the family's own tokenizer class built over a small
vocabulary, carrying the family's language-code tokens (``__de__``,
``deu_Latn``, ``de_DE``; Marian: one language pair, from the folder name
``opus-mt-SRC-TGT`` like the hub's). Outputs are gibberish; what the tests
check is the mechanics: codes, batching, determinism, parts, provenance.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import torch

from alignment.synthetic import synthetic_rows

LANGUAGES = ("en", "de", "fr", "es")
FAMILIES = ("nllb", "m2m100", "mbart50", "marian")
NLLB_CODES = ["eng_Latn", "deu_Latn", "fra_Latn", "spa_Latn", "zho_Hans", "arb_Arab"]
SMALL = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
             encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256, init_std=0.5)


def sentences(n: int = 40, seed: int = 1, lang: str = "en") -> list[str]:
    """Short synthetic sentences (3-8 words) in ``lang``."""
    return [r.texts[lang] for r in synthetic_rows(n, LANGUAGES, seed=seed, min_words=3, max_words=8)]


def _spm(root: Path, vocab_size: int = 120) -> Path:
    """A small sentencepiece model trained on the synthetic sentences (<s>=0 <pad>=1 </s>=2 <unk>=3)."""
    import sentencepiece as spm

    text = [t for r in synthetic_rows(300, LANGUAGES, seed=0) for t in r.texts.values()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=vocab_size,
                                   model_type="unigram", character_coverage=1.0, bos_id=0, pad_id=1, eos_id=2,
                                   unk_id=3, minloglevel=2)
    path = root / "sp.model"
    path.write_bytes(buf.getvalue())
    return path


def _pieces(sp_path: Path) -> list[str]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def _save(model_cls, config, tokenizer, out: Path, seed: int, dtype: torch.dtype = torch.float32) -> Path:
    torch.manual_seed(seed)
    model = model_cls(config).eval().to(dtype)
    model.generation_config.max_length = 64  # random weights never stop on their own
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _vocab_size(tokenizer) -> int:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.get_vocab()]
    extra = list(getattr(tokenizer, "lang_code_to_id", {}).values())
    return max([len(tokenizer), *ids, *extra]) + 1


def build_m2m100(root: Path, seed: int = 0) -> Path:
    from transformers import M2M100Config, M2M100ForConditionalGeneration, M2M100Tokenizer

    out = root / "tiny-m2m100"
    out.mkdir(parents=True, exist_ok=True)
    sp = _spm(out)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for piece in _pieces(sp)[4:]:
        vocab.setdefault(piece, len(vocab))
    (out / "vocab.json").write_text(json.dumps(vocab))
    shutil.move(sp, out / "sentencepiece.bpe.model")
    # "wmt21" is M2M100's small code list: en ha is ja cs ru zh de (no fr, no es)
    tok = M2M100Tokenizer(str(out / "vocab.json"), str(out / "sentencepiece.bpe.model"), language_codes="wmt21")
    config = M2M100Config(vocab_size=_vocab_size(tok), pad_token_id=1, bos_token_id=0, eos_token_id=2,
                          decoder_start_token_id=2, **SMALL)
    return _save(M2M100ForConditionalGeneration, config, tok, out, seed)


def build_nllb(root: Path, seed: int = 0, codes: list[str] = NLLB_CODES, *, size: dict | None = None,
               vocab_rows: int | None = None, name: str = "tiny-nllb") -> Path:
    """NLLB: the M2M100 architecture with an NLLB tokenizer (FLORES codes), as the hub's nllb-200 checkpoints.

    ``size`` overrides the architecture (:data:`NLLB_600M` is NLLB-200-distilled-600M's); ``vocab_rows``
    pads the vocabulary with filler pieces to that many rows (256206 for NLLB-200), so the output
    projection costs what the real one does.
    """
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer

    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "▁": 4}
    for ch in sorted({c for s in sentences(300, seed=0) for c in s if c != " "}):
        vocab.setdefault(ch, len(vocab))
    for i in range(max(0, (vocab_rows or 0) - len(vocab) - len(codes))):
        vocab[f"▁w{i}"] = len(vocab)
    tok = NllbTokenizer(vocab=vocab, merges=[], additional_special_tokens=list(codes), src_lang=codes[0])
    config = M2M100Config(vocab_size=_vocab_size(tok), pad_token_id=1, bos_token_id=0, eos_token_id=2,
                          decoder_start_token_id=2, **(size or SMALL))
    big = size is not None and size.get("d_model", 0) >= 512  # stored in bf16, as the hub's checkpoints
    return _save(M2M100ForConditionalGeneration, config, tok, out, seed, torch.bfloat16 if big else torch.float32)


NLLB_600M = dict(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                 decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
                 max_position_embeddings=1024, scale_embedding=True)
"""facebook/nllb-200-distilled-600M's architecture (with ``vocab_rows=256206``: 615M parameters)."""


def build_mbart50(root: Path, seed: int = 0) -> Path:
    from transformers import MBart50Tokenizer, MBartConfig, MBartForConditionalGeneration

    out = root / "tiny-mbart50"
    out.mkdir(parents=True, exist_ok=True)
    sp = _spm(out)
    vocab = [(p, -1.0) for p in _pieces(sp)]
    sp.unlink()
    tok = MBart50Tokenizer(vocab=vocab, src_lang="en_XX")
    config = MBartConfig(vocab_size=_vocab_size(tok), pad_token_id=1, bos_token_id=0, eos_token_id=2,
                         decoder_start_token_id=2, **SMALL)
    return _save(MBartForConditionalGeneration, config, tok, out, seed)


def build_marian(root: Path, src: str = "en", tgt: str = "de", seed: int = 0) -> Path:
    """A Marian model for one pair, named like the hub's (``opus-mt-en-de``): the pair comes from the name."""
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    out = root / f"opus-mt-{src}-{tgt}"
    out.mkdir(parents=True, exist_ok=True)
    sp = _spm(out)
    shutil.copy(sp, out / "source.spm")
    shutil.move(sp, out / "target.spm")
    vocab = {"</s>": 0, "<unk>": 1}
    for piece in _pieces(out / "source.spm")[4:]:
        vocab.setdefault(piece, len(vocab))
    vocab["<pad>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab))
    tok = MarianTokenizer(str(out / "source.spm"), str(out / "target.spm"), str(out / "vocab.json"))
    pad = vocab["<pad>"]
    config = MarianConfig(vocab_size=len(vocab), pad_token_id=pad, eos_token_id=0, decoder_start_token_id=pad,
                          forced_eos_token_id=0, **SMALL)
    return _save(MarianMTModel, config, tok, out, seed)


BUILDERS = {"nllb": build_nllb, "m2m100": build_m2m100, "mbart50": build_mbart50, "marian": build_marian}
