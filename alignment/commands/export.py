"""``align export CKPT OUT``: a training checkpoint to a Hugging Face + sentence-transformers folder.

``CKPT`` is a Lightning ``.ckpt`` file or a DeepSpeed ZeRO checkpoint folder
(consolidated to fp32 first). The encoder is rebuilt from the Hugging Face
config stored in the checkpoint, so no hub access is needed; the tokenizer is
the one recorded at training time unless ``--tokenizer`` names another.
See :func:`alignment.export.export_checkpoint`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a training checkpoint as a Hugging Face + sentence-transformers folder",
        description="Rebuild the trained encoder from CKPT (a .ckpt file or a DeepSpeed ZeRO folder) and write it "
        "to OUT: config.json + model.safetensors + tokenizer (AutoModel/AutoTokenizer), and the "
        "sentence-transformers modules (SentenceTransformer(OUT).encode gives the training embeddings).",
    )
    parser.add_argument("ckpt", metavar="CKPT", type=Path, help="a Lightning .ckpt file or a DeepSpeed checkpoint folder")
    parser.add_argument("out", metavar="OUT", type=Path, help="folder to write (complete or not at all)")
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="NAME_OR_PATH",
        help="tokenizer to bundle (default: the --data.config.tokenizer recorded in the checkpoint)",
    )
    parser.add_argument("--max-seq-length", type=int, default=128, metavar="N",
                        help="sentence-transformers' max_seq_length (default 128)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from alignment.export import export_checkpoint

    if args.max_seq_length < 1:
        print(f"align export: error: --max-seq-length must be >= 1, got {args.max_seq_length}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        out = export_checkpoint(args.ckpt, args.out, tokenizer=args.tokenizer, max_seq_length=args.max_seq_length,
                                overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"align export: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.ckpt} to {out} in {time.perf_counter() - start:.1f} s")
    return 0
