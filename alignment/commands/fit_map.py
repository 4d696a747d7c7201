"""``align fit-map``: fit per-language post-hoc maps (centring, Procrustes) on a calibration split and save them.

The model encodes the calibration rows exactly as ``align eval`` does (same prefix, truncation, batching);
:func:`alignment.deploy.maps.fit_maps` fits the maps; ``--out`` receives them
(``language_maps.safetensors`` + ``language_maps.json``) and ``--export`` (optional) a copy of the model's
export folder carrying them as a sentence-transformers ``Router`` module
(``SentenceTransformer(folder).encode(texts, task="de")``). ``align eval --maps DIR`` evaluates them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from alignment.commands.common import add_config, build, new_parser, parse
from alignment.deploy.maps import MapKind
from alignment.evaluate.encode import EncodeConfig
from alignment.languages import DEFAULT_PIVOT, LanguageCodeError, normalize_language, parse_languages

HELP = "fit per-language post-hoc maps (centring, Procrustes) on a calibration split; save them, or an export with them"

EXAMPLES = """\
examples:
  # Procrustes maps onto English from 2000 validation rows, and an export that applies them by language
  align fit-map --model runs/demo/export --data data/gettext --split validation --calibration_rows 2000 \\
      --kind procrustes --out runs/demo/maps --export runs/demo/export-maps
  # per-language centring then Procrustes; then evaluate the maps on the test split
  align fit-map --model runs/demo/export --data data/gettext --kind centring+procrustes --out runs/demo/maps
  align eval --model runs/demo/export --data data/gettext --split test --maps runs/demo/maps
"""


@dataclass(kw_only=True)
class FitMapConfig:
    """What ``align fit-map`` fits, on what, and where it writes."""

    model: str
    """Encoder: an export folder of align export / align fit (required for --export), a saved encoder folder,
    or a checkpoint."""
    data: str
    """Calibration data: a shard build (folder or manifest.json), a .tsv or a .jsonl of multi-way rows."""
    out: str
    """Folder to write the maps to (language_maps.safetensors + language_maps.json)."""
    kind: MapKind = "procrustes"
    """procrustes (orthogonal map of each language onto the pivot), centring (subtract each language's mean
    embedding) or centring+procrustes (both, in that order); every step renormalises."""
    split: str = "validation"
    """Manifest split to calibrate on when --data is a shard build (keep it apart from the split you evaluate on)."""
    calibration_rows: int = 2000
    """Rows to calibrate on (the first ones; shard builds are shuffled)."""
    languages: str | None = None
    """Comma-separated languages to fit (default: all in the data)."""
    pivot: str = DEFAULT_PIVOT
    """Pivot language: Procrustes maps every other language onto its space."""
    export: str | None = None
    """Also write this folder: a copy of --model (an export) whose sentence-transformers pipeline ends with
    the maps (Router module, one route per language)."""
    overwrite: bool = False
    """Replace --out / --export if they exist (only folders this command or align export wrote)."""
    device: str = "cpu"
    """Torch device to encode on."""
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    """Batching, truncation, prefix, seed, progress bars (as in align eval)."""

    def __post_init__(self) -> None:
        if self.calibration_rows < 1:
            raise ValueError(f"--calibration_rows must be >= 1, got {self.calibration_rows}")
        try:
            self.pivot = normalize_language(self.pivot)
        except LanguageCodeError as exc:
            raise ValueError(f"--pivot: {exc}") from None
        parse_languages(self.languages, "--languages")
        if self.export is not None and not (Path(self.model) / "modules.json").is_file():
            raise ValueError(f"--export needs --model to be an export folder with modules.json; {self.model} is not")
        for flag, value in (("--out", self.out), ("--export", self.export)):
            if value is not None and Path(value).is_file():
                raise ValueError(f"{flag} {value} is a file; it must be a folder")


def parser():
    p = new_parser("fit-map", "Encode a calibration split with --model and fit per-language maps onto a shared "
                   "space; write them to --out (and, with --export, an export folder that applies them).", EXAMPLES)
    add_config(p, FitMapConfig)
    return p


def run(config: FitMapConfig) -> tuple[Path, Path | None]:
    """Encode, fit, save; returns ``(maps folder, export folder or None)``."""
    from alignment.deploy.maps import MAPS_META, add_maps_to_export, fit_maps, model_fingerprint
    from alignment.evaluate.encode import encode_eval_data, resolve_prefix
    from alignment.evaluate.encoder import load_encoder
    from alignment.evaluate.readers import load_eval_data
    from alignment.export import is_export
    from alignment.staging import check_replaceable

    def ours(folder: Path) -> bool:
        return (folder / MAPS_META).is_file() or is_export(folder)

    outs = [(Path(config.out), "--out")] + ([(Path(config.export), "--export")] if config.export else [])
    for folder, flag in outs:  # before anything is loaded
        check_replaceable(folder, overwrite=config.overwrite, flag=flag, is_ours=ours,
                          what="a maps folder or an export", inputs=[Path(config.model)])  # fmt: skip
    data = load_eval_data(config.data, split=config.split, languages=parse_languages(config.languages, "--languages"),
                          max_rows=config.calibration_rows)  # fmt: skip
    # a maps export: fit on its base encoder (the maps it carries are not applied)
    model, tokenizer, info = load_encoder(config.model, device=config.device, carried_maps=False)
    prefix = resolve_prefix(info, config.encode.prefix)
    encoded = encode_eval_data(model, tokenizer, data, config.encode, prefix=prefix, pivot=config.pivot)
    if encoded.embeddings is None:
        raise ValueError(f"--data {config.data}: calibration needs multi-way translation rows, not scored pairs")
    maps = fit_maps(encoded.embeddings, config.kind)
    maps.model = {"spec": config.model, "fingerprint": model_fingerprint(model), "prefix": prefix,
                  "max_length": config.encode.max_length}  # fmt: skip
    maps.calibration.update(data=str(config.data), split=config.split, rows=encoded.embeddings.num_rows)
    out = maps.save(config.out)
    export = add_maps_to_export(Path(config.model), maps, Path(config.export)) if config.export else None
    return out, export


def main(argv: Sequence[str]) -> int:
    p = parser()
    config = build(p, parse(p, argv, "fit-map"), FitMapConfig, "fit-map")
    start = time.perf_counter()
    try:
        out, export = run(config)
    except (FileExistsError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"align fit-map: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {config.kind} maps to {out}" + (f" and the export {export}" if export else "")
          + f" in {time.perf_counter() - start:.1f} s")  # fmt: skip
    return 0
