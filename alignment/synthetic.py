"""Synthetic multi-way data and a tiny tokenizer: first-class debug assets.

Used by tests, benchmarks, smoke runs and dry runs. The synthetic corpus is
*learnable*: every row is a sequence of concept ids, and each language renders
a concept with its own deterministic surface word, so translations share
structure but no surface tokens (an encoder has to learn the alignment).
"""

from __future__ import annotations

import random
from pathlib import Path

from alignment.data.rows import MultiWayRow

SYNTHETIC_LANGUAGES = ("en", "de", "fr", "es", "ru", "zh-Hans", "ar", "ja")
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(lang: str, concept: int) -> str:
    """The surface form of ``concept`` in ``lang``: stable across runs."""
    rng = random.Random(f"{lang}:{concept}")
    return lang.split("-")[0][:2] + "".join(rng.choice(_LETTERS) for _ in range(rng.randint(2, 6)))


def synthetic_rows(
    n: int,
    languages: tuple[str, ...] | list[str] = SYNTHETIC_LANGUAGES[:4],
    *,
    seed: int = 0,
    concepts: int = 200,
    min_words: int = 3,
    max_words: int = 12,
    missing_prob: float = 0.0,
    pivot: str = "en",
) -> list[MultiWayRow]:
    """``n`` multi-way rows over ``languages``.

    Args:
        missing_prob: probability that a non-pivot language is absent from a
            row (rows missing languages are normal in real corpora).
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        sentence = [rng.randrange(concepts) for _ in range(rng.randint(min_words, max_words))]
        texts = {}
        for lang in languages:
            if lang != pivot and missing_prob and rng.random() < missing_prob:
                continue
            texts[lang] = " ".join(_word(lang, c) for c in sentence)
        if len(texts) < 2:  # keep every row multi-way
            other = next(lang for lang in languages if lang != pivot)
            texts[other] = " ".join(_word(other, c) for c in sentence)
            texts.setdefault(pivot, " ".join(_word(pivot, c) for c in sentence))
        rows.append(MultiWayRow(id=f"syn-{seed}-{i:07d}", texts=texts, pivot=pivot))
    return rows


def tiny_tokenizer(
    languages: tuple[str, ...] | list[str] = SYNTHETIC_LANGUAGES,
    *,
    concepts: int = 200,
    save_dir: str | Path | None = None,
):
    """A real fast (Rust) BERT-style word-level tokenizer over the synthetic vocabulary.

    Returns a ``transformers.PreTrainedTokenizerFast`` with ``[CLS] $A [SEP]``
    post-processing, padding and truncation, like any hub tokenizer; saved to
    ``save_dir`` when given so ``AutoTokenizer.from_pretrained`` loads it.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIAL)}
    for lang in languages:
        for c in range(concepts):
            vocab.setdefault(_word(lang, c), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


def rows_to_batch(tokenizer, rows, languages, pivot: str = "en"):
    """Tokenise ``rows`` into the flat :class:`~alignment.batch.Batch` the model consumes.

    Every language of every row in one ``[N, T]`` tensor; row ids are the rows'
    positions, language ids index ``languages`` (the vocabulary). A direct,
    worker-free path for tests and benchmarks of the model and losses.
    """
    import torch

    from alignment.batch import Batch

    languages = tuple(languages)
    texts, row_ids, lang_ids = [], [], []
    for r, row in enumerate(rows):
        for lang in row.languages:
            texts.append(row.texts[lang])
            row_ids.append(r)
            lang_ids.append(languages.index(lang))
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return Batch(enc["input_ids"], enc["attention_mask"], torch.tensor(row_ids), torch.tensor(lang_ids),
                 languages, languages.index(pivot), tuple(r.id for r in rows), texts=tuple(texts))
