"""``align export CKPT OUT``: a training checkpoint to a Hugging Face + sentence-transformers folder.

``CKPT`` is a Lightning ``.ckpt`` file or a DeepSpeed ZeRO checkpoint folder
(consolidated to fp32 first). The encoder is rebuilt from the Hugging Face
config stored in the checkpoint, so no hub access is needed; the tokenizer is
the one recorded at training time unless ``--tokenizer`` names another.
See :func:`alignment.export.export_checkpoint`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from alignment.commands.common import new_parser, parse

HELP = "export a training checkpoint as a Hugging Face + sentence-transformers folder"


def parser():
    p = new_parser(
        "export",
        "Rebuild the trained encoder from CKPT (a .ckpt file or a DeepSpeed ZeRO folder) and write it to OUT: "
        "config.json + model.safetensors + tokenizer (AutoModel/AutoTokenizer), and the sentence-transformers "
        "modules (SentenceTransformer(OUT).encode gives the training embeddings).",
        "example:\n  align export runs/demo/checkpoints/last.ckpt runs/demo/export --max_seq_length 256\n",
    )
    p.add_argument("ckpt", metavar="CKPT", help="a Lightning .ckpt file or a DeepSpeed checkpoint folder")
    p.add_argument("out", metavar="OUT", help="folder to write (complete or not at all)")
    p.add_argument("--tokenizer", type=str | None, default=None, metavar="NAME_OR_PATH",
                   help="Tokenizer to bundle (default: the --data.tokenizer recorded in the checkpoint).")
    p.add_argument("--max_seq_length", type=int, default=128, metavar="N", help="sentence-transformers' max_seq_length.")
    p.add_argument("--overwrite", type=bool, default=False, help="Replace OUT if it exists.")
    add_adapter_argument(p)
    p.add_argument("--format", type=Literal["hf", "onnx"], default="hf",
                   help="hf: the Hugging Face + sentence-transformers folder; onnx: the same folder plus "
                   "onnx/model.onnx (fp32) and onnx/model_qint8.onnx (int8 dynamic quantisation), "
                   "for onnxruntime and sentence-transformers' ONNX backend.")
    p.add_argument("--onnx_int8", type=bool, default=True, help="With --format onnx, also write the int8 graph.")
    p.add_argument("--maps", type=str | None, default=None, metavar="DIR",
                   help="Language maps from align fit-map (fitted with this checkpoint's model) to carry in the "
                   "export as a sentence-transformers Router module: SentenceTransformer(OUT).encode(texts, task=LANG).")
    return p


def add_adapter_argument(p) -> None:
    """``--adapter merge|peft``: how an encoder trained with peft adapters is written (alignment/adapters.py)."""
    from alignment.adapters import ExportAdapter

    p.add_argument("--adapter", type=ExportAdapter, default="merge",
                   help="For an encoder trained with --model.encoder.adapter.method lora: 'merge' folds the adapter "
                   "into a plain model (SentenceTransformer(OUT) loads it; language adapters: a Router, one merged "
                   "encoder per adapter, chosen by encode(..., task=LANG)); 'peft' writes a peft adapter folder "
                   "(PeftModel.from_pretrained(AutoModel.from_pretrained(base), OUT)). Ignored without adapters.")


def deployment_files(fmt: str, maps_dir: str | None, onnx_int8: bool) -> Callable | None:
    """What --format onnx and --maps add to the export folder before it is published (None: nothing)."""
    if fmt == "hf" and maps_dir is None:
        return None
    from alignment.deploy.maps import LanguageMaps, attach_maps, check_same_model, model_fingerprint

    maps = LanguageMaps.load(maps_dir) if maps_dir is not None else None  # a bad --maps fails before any work

    def extra(encoder, folder: Path) -> None:
        if maps is not None:
            check_same_model(maps, model_fingerprint(encoder), "the checkpoint")
            attach_maps(folder, maps)
        if fmt == "onnx":
            from alignment.deploy.onnx_export import write_onnx_files

            write_onnx_files(encoder, folder, int8=onnx_int8)

    return extra


def main(argv: Sequence[str]) -> int:
    from alignment.export import export_checkpoint

    args = parse(parser(), argv, "export")
    if args.max_seq_length < 1:
        print(f"align export: error: --max_seq_length must be >= 1, got {args.max_seq_length}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        extra = deployment_files(args.format, args.maps, args.onnx_int8)
        out = export_checkpoint(Path(args.ckpt), Path(args.out), tokenizer=args.tokenizer,
                                max_seq_length=args.max_seq_length, overwrite=args.overwrite,
                                adapter=args.adapter, extra=extra)  # fmt: skip
    except (FileExistsError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"align export: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.ckpt} to {out} in {time.perf_counter() - start:.1f} s")
    return 0
