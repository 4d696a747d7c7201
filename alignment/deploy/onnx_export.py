"""ONNX exports of a trained encoder: fp32 (``torch.onnx.export``) and int8 (onnxruntime dynamic quantisation).

One graph, ``onnx/model.onnx``, inputs ``input_ids`` and ``attention_mask`` (int64, dynamic batch and
sequence axes), two outputs:

* ``last_hidden_state`` ``(N, T, H)``: the backbone's token states, the output sentence-transformers'
  ONNX backend reads (``SentenceTransformer(folder, backend="onnx")``, which needs ``optimum``; this
  project does not install it) and then pools with the folder's own ``1_Pooling``/``2_Dense`` modules;
* ``sentence_embedding`` ``(N, D)``: pooling, projection and normalisation in the graph, what
  ``onnxruntime.InferenceSession(path).run(["sentence_embedding"], {...})`` gives a plain runtime user.

``onnx/model_qint8.onnx``: the same graph with the weights of its MatMul/Gemm nodes quantised to int8
by ``onnxruntime.quantization.quantize_dynamic`` (activations quantised per batch at run time).
Sentence-transformers selects it with ``model_kwargs={"file_name": "onnx/model_qint8.onnx"}``.

Exported with the TorchScript exporter (``dynamo=False``): it traces BERT/XLM-R encoders with dynamic
axes in a few seconds, where the dynamo exporter needs the model's control flow to be export-friendly.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from alignment.model import DualEncoder, pool

ONNX_DIR = "onnx"
ONNX_FP32 = "model.onnx"
ONNX_INT8 = "model_qint8.onnx"
OPSET = 17
INPUTS = ("input_ids", "attention_mask")
OUTPUTS = ("last_hidden_state", "sentence_embedding")


class SentenceGraph(nn.Module):
    """``DualEncoder.encode`` with the token states as a second output, for tracing."""

    def __init__(self, encoder: DualEncoder) -> None:
        super().__init__()
        if encoder.pivot_backbone is not None:
            raise ValueError("a model with a separate pivot tower (--model.encoder.share_encoder=false) has two "
                             "graphs; ONNX export supports shared encoders only")  # fmt: skip
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        enc = self.encoder
        hidden = enc.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, T, H)
        emb = pool(hidden, attention_mask, enc.pooling)  # (N, H)
        if enc.projection is not None:
            emb = enc.projection(emb)  # (N, D)
        if enc.normalize:
            emb = emb / emb.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return hidden, emb


def export_onnx(encoder: DualEncoder, path: str | os.PathLike, *, opset: int = OPSET) -> Path:
    """Trace ``encoder`` (fp32, CPU, eval mode) to ``path``; the caller publishes the folder holding it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = SentenceGraph(encoder).eval().float().cpu()
    ids = torch.ones(2, 8, dtype=torch.long)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "last_hidden_state": {0: "batch", 1: "sequence"}, "sentence_embedding": {0: "batch"}}  # fmt: skip
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings on Python branches over shapes, expected for BERT
        torch.onnx.export(graph, (ids, mask), str(path), input_names=list(INPUTS), output_names=list(OUTPUTS),
                          dynamic_axes=axes, opset_version=opset, dynamo=False)  # fmt: skip
    return path


def quantize_onnx(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """int8 dynamic quantisation of an ONNX file (weights int8, per-channel; activations at run time)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" advice is for static quantisation of CNNs
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)
    return Path(target)


def write_onnx_files(encoder: DualEncoder, folder: Path, *, int8: bool = True) -> list[Path]:
    """``onnx/model.onnx`` (+ ``onnx/model_qint8.onnx``) inside ``folder`` (an export being written)."""
    fp32 = export_onnx(encoder, folder / ONNX_DIR / ONNX_FP32)
    written = [fp32]
    if int8:
        written.append(quantize_onnx(fp32, folder / ONNX_DIR / ONNX_INT8))
    return written


def quantize_torch(encoder: DualEncoder) -> nn.Module:
    """A copy of ``encoder`` with every ``nn.Linear`` int8-quantised (PyTorch dynamic quantisation, CPU only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(encoder.float().cpu(), {nn.Linear}, dtype=torch.qint8, inplace=False)


class OnnxEncoder(nn.Module):
    """An ONNX file run by onnxruntime, with the slice of ``DualEncoder``'s API that encoding uses
    (:func:`alignment.evaluate.encode.encode_texts`): ``encode(input_ids, attention_mask)``,
    ``embedding_dim``, ``backbone.config``, ``pivot_backbone``."""

    def __init__(self, path: str | os.PathLike, source: DualEncoder, threads: int | None = None) -> None:
        import onnxruntime as ort

        super().__init__()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.embedding_dim = source.embedding_dim
        self.config = source.backbone.config
        self.pivot_backbone = None
        self._anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # device of the outputs: CPU

    @property
    def backbone(self) -> nn.Module:
        holder = nn.Module()
        holder.config = self.config
        return holder

    def encode(self, input_ids: Tensor, attention_mask: Tensor, *, pivot: bool = False) -> Tensor:
        feeds = {"input_ids": input_ids.cpu().long().numpy(), "attention_mask": attention_mask.cpu().long().numpy()}
        (emb,) = self.session.run(["sentence_embedding"], feeds)
        return torch.from_numpy(emb)
