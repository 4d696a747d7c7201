"""``align mine SRC TGT``: mine translation pairs between two monolingual text files (LASER-style).

Both files (one sentence per line) are embedded with the encoder, every source
is margin-scored against its ``k`` nearest targets and every target against its
``k`` nearest sources (:func:`alignment.evaluate.mining.mine`; exact chunked
search, or FAISS when installed and the search is large), and the pairs scoring
at or above ``--mining.threshold`` are written as a TSV sorted by score::

    score   src_line  tgt_line  src_text  tgt_text

Two modes read the files as *line-aligned* (line i of SRC translates line i of
TGT; the line counts must match):

``--gold``
    mine as usual, then report precision, recall and F1 of the mined pairs
    against the aligned pairs (a BUCC-style check of the encoder and threshold);
``--paired``
    do not search: score each aligned pair with the same margin (its
    neighbourhoods taken over both whole files) and keep those above the
    threshold, i.e. filter a noisy parallel corpus.

Embeddings that are NaN/inf or zero-norm are reported with their line numbers
and left out; they never become pairs.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from alignment.commands.common import add_config, build, new_parser, parse
from alignment.commands.eval import USER_ERRORS, error
from alignment.evaluate.datasets import EvalDataError, TextLine, read_text_file
from alignment.evaluate.embeddings import invalid_vectors, l2_normalize
from alignment.evaluate.encode import EncodeConfig, encode_texts, quiet_library_bars, resolve_prefix
from alignment.evaluate.encoder import load_encoder
from alignment.evaluate.mining import MiningConfig, mine
from alignment.evaluate.report import markdown_table
from alignment.evaluate.search import resolve_backend, score_aligned
from alignment.model import Pooling

TSV_HEADER = ("score", "src_line", "tgt_line", "src_text", "tgt_text")


@dataclass
class MineRunConfig:
    """What ``align mine`` does (one field per flag)."""

    src: str
    """Source text file, one sentence per line (.gz/.bz2/.xz read compressed)."""
    tgt: str
    """Target text file, one sentence per line."""
    model: str
    """Encoder spec (as for align eval)."""
    out: str
    """Output TSV: score, src line, tgt line, src text, tgt text; sorted by score (tabs in texts become spaces)."""
    mining: MiningConfig = field(default_factory=MiningConfig)
    """Margin, neighbourhood, threshold, combination mode, k-NN backend, chunking."""
    gold: bool = False
    """SRC and TGT are line-aligned translations: also report precision / recall / F1 of the mined pairs."""
    paired: bool = False
    """SRC and TGT are line-aligned: score each line pair (no search) and keep those above the threshold."""
    pooling: Pooling | None = None
    """Override the pooling (default: the encoder meta's, else mean)."""
    device: str = "cpu"
    """Torch device to encode on."""
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    """Batching, truncation, prefix, seed, progress bars."""

    def __post_init__(self) -> None:
        if self.gold and self.paired:
            raise ValueError("--gold and --paired exclude each other: --gold mines and checks, --paired only scores")
        if Path(self.out).is_dir():
            raise ValueError(f"--out {self.out} is a folder; give the path of the TSV to write")

    @property
    def aligned(self) -> bool:
        return self.gold or self.paired


# --------------------------------------------------------------------------- inputs


def read_inputs(config: MineRunConfig) -> tuple[list[TextLine], list[TextLine]]:
    """The sentences to embed from SRC and TGT.

    Unaligned: every non-blank line of each file. Aligned (``--gold`` / ``--paired``):
    the line counts must match, and line pairs with a blank side are skipped.

    Raises:
        EvalDataError: a missing or undecodable file, or aligned files whose line counts differ.
    """
    src = read_text_file(config.src, keep_empty=config.aligned)
    tgt = read_text_file(config.tgt, keep_empty=config.aligned)
    if config.aligned:
        if len(src) != len(tgt):
            flag = "--gold" if config.gold else "--paired"
            raise EvalDataError(
                f"{flag} needs line-aligned files, but {config.src} has {len(src)} lines and {config.tgt} has "
                f"{len(tgt)}: line i of SRC must translate line i of TGT"
            )
        keep = [i for i, (s, t) in enumerate(zip(src, tgt)) if s.text.strip() and t.text.strip()]
        src, tgt = [src[i] for i in keep], [tgt[i] for i in keep]
    for path, lines in ((config.src, src), (config.tgt, tgt)):
        if not lines:
            raise EvalDataError(f"{path}: no sentences to mine (the file is empty or blank)")
    return src, tgt


def valid_rows(vectors: Tensor, lines: list[TextLine], path: str) -> Tensor:
    """Boolean ``(N,)`` mask of usable embeddings; NaN/inf and zero-norm ones are reported by line."""
    non_finite, zero = invalid_vectors(vectors)
    valid = torch.ones(len(lines), dtype=torch.bool)
    for kind, idx in (("NaN/inf", non_finite), ("zero-norm", zero)):
        if idx.numel():
            shown = ", ".join(str(lines[i].lineno) for i in idx[:5].tolist()) + (", ..." if idx.numel() > 5 else "")
            print(
                f"align mine: warning: {path}: {idx.numel()} {kind} embeddings (lines {shown}) are left out",
                file=sys.stderr,
            )
            valid[idx] = False
    if not valid.any():
        raise EvalDataError(f"{path}: every embedding is NaN/inf or zero-norm; nothing to mine (is the model broken?)")
    return valid


# --------------------------------------------------------------------------- scoring


@dataclass
class ScoredLines:
    """Pairs to write: indices into the SRC and TGT sentence lists, and scores, sorted by score."""

    src: list[int]
    tgt: list[int]
    scores: list[float]

    def __len__(self) -> int:
        return len(self.scores)


def _subset_index(valid: Tensor) -> Tensor:
    return valid.nonzero().flatten()  # (n_valid,) positions in the full list


def mine_lines(x: Tensor, y: Tensor, x_ok: Tensor, y_ok: Tensor, config: MineRunConfig) -> ScoredLines:
    """Mine (or, ``--paired``, score) the valid embeddings; indices come back in the full lists' numbering."""
    if config.paired:
        both = _subset_index(x_ok & y_ok)  # (n,)
        xs, ys = l2_normalize(x[both]), l2_normalize(y[both])
        m = config.mining
        scores = score_aligned(xs, ys, k=m.k, margin=m.margin, chunk_size=m.chunk_size, backend=m.backend)
        keep = (scores >= m.threshold).nonzero().flatten()
        order = sorted(keep.tolist(), key=lambda i: (-float(scores[i]), i))
        idx = [int(both[i]) for i in order]
        return ScoredLines(idx, idx, [float(scores[i]) for i in order])
    xi, yi = _subset_index(x_ok), _subset_index(y_ok)
    pairs = mine(x[xi], y[yi], config.mining)
    return ScoredLines([int(xi[s]) for s in pairs.src], [int(yi[t]) for t in pairs.tgt], pairs.scores.tolist())


def gold_scores(found: ScoredLines, num_gold: int) -> dict[str, float]:
    """Precision, recall and F1 of mined pairs against the aligned pairs ``(i, i)`` of ``num_gold`` lines."""
    correct = sum(s == t for s, t in zip(found.src, found.tgt))
    precision = correct / len(found) if len(found) else math.nan
    recall = correct / num_gold if num_gold else math.nan
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"correct": correct, "precision": precision, "recall": recall, "f1": f1}


# --------------------------------------------------------------------------- output


def _cell(text: str) -> str:
    return text.replace("\t", " ")


def write_pairs(path: str | os.PathLike, found: ScoredLines, src: list[TextLine], tgt: list[TextLine]) -> Path:
    """Write the TSV (header :data:`TSV_HEADER`) through a temporary file, so a failed run leaves no half file."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write("\t".join(TSV_HEADER) + "\n")
            for s, t, score in zip(found.src, found.tgt, found.scores):
                a, b = src[s], tgt[t]
                fh.write(f"{score:.6f}\t{a.lineno}\t{b.lineno}\t{_cell(a.text)}\t{_cell(b.text)}\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def summary(config: MineRunConfig, src: list, tgt: list, found: ScoredLines, times: dict[str, float]) -> str:
    """The run as a Markdown table (counts, settings, score range, timing, gold scores)."""
    scores = torch.tensor(found.scores, dtype=torch.float64)
    m = config.mining
    backend = "none (paired)" if config.paired else resolve_backend(m.backend, len(src) * len(tgt))
    rows = [
        ("source sentences", len(src)),
        ("target sentences", len(tgt)),
        ("mode", "paired scoring" if config.paired else m.mode),
        ("margin / k / threshold", f"{m.margin} / {m.k} / {m.threshold}"),
        ("k-NN backend", backend),
        ("pairs written", len(found)),
    ]
    if len(found):
        rows.append(("score max / median / min", f"{scores.max():.4f} / {scores.median():.4f} / {scores.min():.4f}"))
    rows += [
        ("encode seconds", f"{times['encode']:.2f}"),
        ("mine seconds", f"{times['mine']:.2f}"),
    ]
    if config.gold:
        gold = gold_scores(found, len(src))
        rows += [(f"gold {k}", gold[k]) for k in ("correct", "precision", "recall", "f1")]
    return markdown_table(("", "value"), rows)


# --------------------------------------------------------------------------- the run


HELP = "mine translation pairs between two monolingual text files with margin scoring"
EXAMPLES = """\
examples:
  align mine news.de news.en --model runs/demo/export --out mined.de-en.tsv --mining.threshold 1.06
  align mine test.de test.en --model runs/demo/export --out check.tsv --gold       # P/R/F1
  align mine crawl.de crawl.en --model runs/demo/export --out clean.tsv --paired   # filter pairs
  align mine a.de a.en --model runs/demo/export --out m.tsv --mining.margin distance --mining.threshold 0.1 \\
      --mining.k 8 --encode.batch_size 128
"""


def parser():
    """``align mine``'s parser: SRC, TGT and every other field of :class:`MineRunConfig`."""
    p = new_parser(
        "mine",
        "Embed both files (one sentence per line), margin-score every source against its k nearest targets and "
        "every target against its k nearest sources (exact search, or FAISS when installed and the search is "
        "large), and write the pairs scoring at or above --mining.threshold as a TSV sorted by score: score, "
        "src_line, tgt_line, src_text, tgt_text. --gold and --paired read the files as line-aligned.",
        EXAMPLES,
    )
    p.add_argument("src", metavar="SRC", help="Source text file, one sentence per line (.gz/.bz2/.xz read compressed).")
    p.add_argument("tgt", metavar="TGT", help="Target text file, one sentence per line.")
    add_config(p, MineRunConfig, skip={"src", "tgt"})
    return p


def main(argv: Sequence[str]) -> int:
    p = parser()
    ns = parse(p, argv, "mine")
    config = build(p, ns, MineRunConfig, "mine", src=ns.src, tgt=ns.tgt)
    try:
        quiet_library_bars(config.encode)
        src, tgt = read_inputs(config)
        model, tokenizer, info = load_encoder(config.model, device=config.device, pooling=config.pooling)
        prefix = resolve_prefix(info, config.encode.prefix)
        start = time.perf_counter()
        x, y = (
            encode_texts(model, tokenizer, [s.text for s in lines], config.encode, prefix=prefix, desc=Path(path).name)
            for lines, path in ((src, config.src), (tgt, config.tgt))
        )  # (Nx, D), (Ny, D)
        times = {"encode": time.perf_counter() - start}
        start = time.perf_counter()
        found = mine_lines(x, y, valid_rows(x, src, config.src), valid_rows(y, tgt, config.tgt), config)
        times["mine"] = time.perf_counter() - start
        out = write_pairs(config.out, found, src, tgt)
    except (*USER_ERRORS, ImportError) as exc:
        return error("mine", exc)
    print(summary(config, src, tgt, found, times))
    print(f"\nwrote {len(found)} pairs to {out}")
    return 0
