"""``align eval --variants``: retrieval quality, size and encode speed of deployment variants, side by side.

Model variants (each encodes the whole evaluation set with the same tokenisation, prefix and batching):

* ``fp32``: the model as loaded;
* ``int8``: PyTorch dynamic quantisation of every ``nn.Linear`` (int8 weights, activations quantised per
  batch; CPU only);
* ``onnx``: the ``onnx/model.onnx`` graph of ``align export --format onnx``, run by onnxruntime (CPU);
* ``onnx-int8``: that graph after ``onnxruntime.quantization.quantize_dynamic`` (int8 weights).

Embedding variants (the fp32 model's embeddings, quantised for the index with sentence-transformers'
``quantize_embeddings``):

* ``binary``: ``precision="ubinary"``, one bit per dimension (D/8 bytes); retrieval on the +-1 vectors, whose
  cosine ranks exactly as the Hamming distance does;
* ``emb-int8``: ``precision="int8"``, one byte per dimension, ranges calibrated on the evaluated embeddings
  themselves; retrieval by cosine of the int8 vectors.

Size: the model file each variant ships (fp32 and int8 torch: its serialised state dict; ONNX: the
``.onnx`` file); embedding variants ship the fp32 model and add ``bytes/embedding``. Speed: sentences per
second of the encoding pass (wall clock; on a shared machine, indicative only).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignment.evaluate.embeddings import MultiWayEmbeddings
from alignment.evaluate.procrustes import ProcrustesReport, procrustes_report
from alignment.evaluate.retrieval import RetrievalConfig, evaluate_retrieval

MODEL_VARIANTS = ("fp32", "int8", "onnx", "onnx-int8")
EMBEDDING_VARIANTS = ("binary", "emb-int8")
VARIANTS = MODEL_VARIANTS + EMBEDDING_VARIANTS


def parse_variants(text: str | None, flag: str = "--variants") -> tuple[str, ...]:
    """``"fp32,onnx,binary"`` -> the names, checked; fp32 (the reference) is always first."""
    if text is None:
        return ()
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad or not names:
        raise ValueError(f"{flag}: must be a comma-separated list of {', '.join(VARIANTS)}, got {text!r}")
    return tuple(dict.fromkeys(["fp32", *names]))


@dataclass
class VariantRow:
    """One line of the variants table."""

    variant: str
    model_mb: float
    bytes_per_embedding: int
    sentences_per_s: float
    retrieval_acc: float
    xsim: float
    cosine_to_fp32: float | None
    """Mean cosine between the variant's and the fp32 model's embedding of each sentence (model variants)."""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _file_mb(path: Path) -> float:
    return path.stat().st_size / 2**20


def _state_dict_mb(module: torch.nn.Module, folder: Path, name: str) -> float:
    path = folder / name
    torch.save(module.state_dict(), path)
    return _file_mb(path)


def _cosine(a: MultiWayEmbeddings, b: MultiWayEmbeddings) -> float | None:
    if a.num_sentences != b.num_sentences or a.row_keys != b.row_keys or a.languages != b.languages:
        return None  # different sentences were dropped as invalid: no row-by-row comparison
    return float((a.embeddings * b.embeddings).sum(-1).mean())


def quantized_embeddings(emb: MultiWayEmbeddings, variant: str) -> MultiWayEmbeddings:
    """``emb`` through ``quantize_embeddings`` and back to float vectors for retrieval."""
    from sentence_transformers.util.quantization import quantize_embeddings

    x = emb.embeddings.cpu().numpy()
    if variant == "binary":
        bits = np.unpackbits(quantize_embeddings(x, precision="ubinary"), axis=-1)[:, : x.shape[1]]
        vectors = bits.astype(np.float32) * 2 - 1  # +-1: cosine = 1 - 2 hamming / D
    else:
        vectors = quantize_embeddings(x, precision="int8", calibration_embeddings=x).astype(np.float32)
    return emb.with_embeddings(torch.from_numpy(vectors))


def model_variant(name: str, encoder: Any, folder: Path) -> tuple[Any, float]:
    """``(model to encode with, its size in MB)`` for a model variant; ONNX files go to ``folder``."""
    from alignment.deploy import onnx_export as ox

    if name == "fp32":
        return encoder, _state_dict_mb(encoder, folder, "fp32.pt")
    if name == "int8":
        quantized = ox.quantize_torch(encoder)
        return quantized, _state_dict_mb(quantized, folder, "int8.pt")
    fp32 = folder / ox.ONNX_FP32
    if not fp32.exists():
        ox.export_onnx(encoder, fp32)
    path = fp32 if name == "onnx" else folder / ox.ONNX_INT8
    if name == "onnx-int8" and not path.exists():
        ox.quantize_onnx(fp32, path)
    return ox.OnnxEncoder(path, encoder), _file_mb(path)


def evaluate_variants(
    names: Iterable[str],
    encode: Any,
    encoder: Any,
    reference: Any,
    retrieval: RetrievalConfig | None = None,
    training_languages: Iterable[str] | None = None,
) -> list[VariantRow]:
    """The variants table.

    Args:
        encode: ``encode(model) -> EncodedEvalData`` (the evaluation set, encoded as ``align eval`` does).
        encoder: the fp32 encoder; reference: its ``EncodedEvalData`` (already computed).
    """
    rows: list[VariantRow] = []
    ref = reference.embeddings
    fp32_mb = float("nan")
    with tempfile.TemporaryDirectory(prefix="align-variants-") as tmp:
        for name in names:
            if name in MODEL_VARIANTS:
                model, size = model_variant(name, encoder, Path(tmp))
                encoded = reference if name == "fp32" else encode(model)
                emb, speed, width = encoded.embeddings, encoded.sentences_per_second, 4 * ref.dim
                cos = _cosine(emb, ref)
                fp32_mb = size if name == "fp32" else fp32_mb
            else:  # the fp32 model ships; the index holds the quantised vectors
                start = time.perf_counter()
                emb = quantized_embeddings(ref, name)
                speed = reference.num_sentences / (reference.seconds + time.perf_counter() - start)
                size, cos, width = fp32_mb, None, ref.dim // 8 if name == "binary" else ref.dim
            table = evaluate_retrieval(emb, retrieval, training_languages=training_languages)
            rows.append(VariantRow(name, size, width, speed, table.mean("accuracy"), table.mean("xsim_error"), cos))
    return rows


def maps_report(emb: MultiWayEmbeddings, maps: Any, retrieval: RetrievalConfig | None = None,
                training_languages: Iterable[str] | None = None) -> ProcrustesReport:
    """Retrieval on every evaluated row without and with the saved maps (fitted on another split)."""
    before = evaluate_retrieval(emb, retrieval, training_languages=training_languages)
    after = evaluate_retrieval(maps.apply(emb), retrieval, training_languages=training_languages)
    return procrustes_report(before, after, maps.calibration.get("sentences", {}), emb.num_rows)


# --------------------------------------------------------------------------- report hooks


def deploy_flat(results: Any) -> dict[str, float]:
    """``maps/retrieval_acc_before|after/mean|<pair>`` and ``variant/<name>/<column>`` for flat_metrics."""
    out: dict[str, float] = {}
    report = getattr(results, "maps", None)
    if report is not None:
        for metric, name in (("accuracy", "retrieval_acc"), ("xsim_error", "xsim")):
            for side, table in (("before", report.before), ("after", report.after)):
                out[f"maps/{name}_{side}/mean"] = table.mean(metric)
                out.update({f"maps/{name}_{side}/{r.key}": r.value(metric) for r in table.results})
    for row in getattr(results, "variants", None) or []:
        out.update({f"variant/{row['variant']}/{k}": v for k, v in row.items()
                    if k != "variant" and v is not None})  # fmt: skip
    return out


def deploy_sections(results: Any, fmt: Any, table: Any) -> list[str]:
    """report.md sections: mapped vs unmapped retrieval, the variants table."""
    sections = []
    report = getattr(results, "maps", None)
    if report is not None:
        acc, xs = report.rows("accuracy"), report.rows("xsim_error")
        rows = [(a["pair"], a["before"], a["after"], a["delta"], x["before"], x["after"]) for a, x in zip(acc, xs)]
        sections += [
            "## Post-hoc language maps (align fit-map), unmapped vs mapped",
            f"{results.meta.get('maps', 'maps')}; all {report.num_heldout_rows} evaluated rows. "
            f"Mean accuracy {fmt(report.before.mean('accuracy'))} -> {fmt(report.after.mean('accuracy'))}.",
            table(("pair", "acc unmapped", "acc mapped", "acc delta", "xSIM unmapped", "xSIM mapped"), rows),
        ]
    variants = getattr(results, "variants", None) or []
    if variants:
        cols = ("variant", "retrieval acc", "xSIM", "model MB", "bytes/embedding", "sentences/s", "cosine to fp32")
        keys = ("variant", "retrieval_acc", "xsim", "model_mb", "bytes_per_embedding", "sentences_per_s",
                "cosine_to_fp32")  # fmt: skip
        sections += [
            "## Deployment variants (quality / size / speed)",
            "Speed is wall clock on this machine (indicative when it is shared); embedding variants (binary, "
            "emb-int8) quantise the fp32 model's embeddings for the index.",
            table(cols, [tuple(row[k] for k in keys) for row in variants]),
        ]
    return sections
