"""Load an encoder from any model spec (:func:`classify_spec`, :func:`load_encoder`).

Model specs:

* a folder written by :meth:`DualEncoder.save_pretrained <alignment.model.DualEncoder.save_pretrained>`
  or by the export (Hugging Face config + weights + tokenizer + ``alignment_encoder.json``,
  which records pooling, normalisation, projection and, for E5, the query/passage prefixes);
* a plain Hugging Face model folder or hub name: mean pooling + L2 normalisation
  unless ``pooling`` says otherwise (hub names need the network or the local cache);
* a Lightning checkpoint file (``*.ckpt``) or a DeepSpeed checkpoint folder:
  converted by ``alignment.export.encoder_from_checkpoint``.

:mod:`alignment.evaluate.encode` embeds text with the loaded encoder;
:mod:`alignment.evaluate.mteb_bridge` rebuilds it for MTEB.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignment.model import ENCODER_META, POOLINGS, DualEncoder, max_positions

SPEC_KINDS = ("alignment-folder", "hf-folder", "hub", "lightning-checkpoint", "deepspeed-checkpoint")
"""What a model spec can be (:func:`classify_spec`)."""
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
"""Environment variables that forbid downloads from the Hugging Face hub."""


class ModelLoadError(RuntimeError):
    """A model spec that does not load: the message names it, what it looked like, and why."""


# --------------------------------------------------------------------------- model specs


def is_offline(environ: Mapping[str, str] | None = None) -> bool:
    """True when an :data:`OFFLINE_VARS` variable is set to a true value (``1``, ``true``, ``yes``, ``on``)."""
    env = os.environ if environ is None else environ
    return any(env.get(var, "").strip().lower() in ("1", "true", "yes", "on") for var in OFFLINE_VARS)


def _is_deepspeed_checkpoint(path: Path) -> bool:
    if not path.is_dir():
        return False
    if (path / "latest").is_file() or (path / "zero_to_fp32.py").is_file():
        return True
    return any(path.glob("*/mp_rank_*_model_states.pt")) or any(path.glob("mp_rank_*_model_states.pt"))


def classify_spec(spec: str | os.PathLike) -> str:
    """Which of :data:`SPEC_KINDS` ``spec`` is, from the file system alone (nothing is loaded)."""
    path = Path(spec)
    if path.is_file() and path.suffix == ".ckpt":
        return "lightning-checkpoint"
    if _is_deepspeed_checkpoint(path):
        return "deepspeed-checkpoint"
    if path.is_dir() and (path / ENCODER_META).is_file():
        return "alignment-folder"
    if path.is_dir():
        return "hf-folder"
    if path.exists():
        return "hf-folder"  # a file that is not a checkpoint: loading reports what is wrong with it
    return "hub"


@dataclass(frozen=True)
class EncoderInfo:
    """What was loaded and how it embeds (the third item :func:`load_encoder` returns)."""

    spec: str
    """The model spec as given."""
    kind: str
    """One of :data:`SPEC_KINDS`."""
    pooling: str
    """Token pooling in use: mean, cls or last."""
    normalize: bool
    """Whether embeddings are L2-normalised."""
    embedding_dim: int
    """Width D of the embeddings."""
    query_prefix: str = ""
    """Prefix the encoder was trained with for queries and for symmetric tasks such as bitext mining
    and STS (E5: ``"query: "``): from the encoder meta, else the sentence-transformers prompts of an
    export or checkpoint."""
    passage_prefix: str = ""
    """Prefix for the passage side of asymmetric retrieval (E5: ``"passage: "``)."""
    max_positions: int | None = None
    """Longest input, in tokens with specials, that the position table allows (None: unbounded)."""
    card: dict = field(default_factory=dict, compare=False)
    """The raw ``alignment_encoder.json`` (empty when there is none)."""

    def describe(self) -> str:
        prefix = f", prefix {self.query_prefix!r}" if self.query_prefix else ""
        norm = "normalised" if self.normalize else "unnormalised"
        return f"{self.spec} ({self.kind}): {self.pooling} pooling, {norm}, dim {self.embedding_dim}{prefix}"


def read_card(path: Path) -> dict:
    file = path / ENCODER_META
    if not file.is_file():
        return {}
    try:
        card = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{file}: not valid JSON ({exc}); the encoder meta is unreadable") from None
    if not isinstance(card, dict):
        raise ModelLoadError(f"{file}: expected a JSON object, got {type(card).__name__}")
    return card


def describe_failure(spec: str, kind: str, exc: BaseException) -> str:
    looked = {
        "alignment-folder": "an encoder folder (it has alignment_encoder.json)",
        "hf-folder": "a local folder or file (a Hugging Face model folder needs config.json and weights)",
        "hub": "a Hugging Face hub name (no such local path)",
        "lightning-checkpoint": "a Lightning checkpoint file",
        "deepspeed-checkpoint": "a DeepSpeed checkpoint folder",
    }[kind]
    msg = f"model {spec!r} does not load: it looked like {looked}; {type(exc).__name__}: {exc}"
    if kind == "hub" and is_offline():
        msg += (
            f". Hub names cannot be fetched offline ({', '.join(v for v in OFFLINE_VARS if os.environ.get(v))} set) "
            "unless the model is already in the local cache: pass a local folder instead"
        )
    return msg


def encoder_max_positions(model: DualEncoder) -> int | None:
    return max_positions(model.backbone.config)


def _load_checkpoint(spec: str, kind: str) -> tuple[DualEncoder, Any, dict[str, str]]:
    """``(encoder, tokenizer, prompts)`` from ``alignment.export.encoder_from_checkpoint``."""
    try:
        from alignment.export import encoder_from_checkpoint
    except ImportError as exc:
        raise NotImplementedError(
            f"{spec}: loading a {kind.replace('-', ' ')} needs alignment.export.encoder_from_checkpoint, "
            f"which is not available in this installation ({exc}); export the checkpoint to a folder first"
        ) from None
    try:
        model, tokenizer, info = encoder_from_checkpoint(spec)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ModelLoadError(describe_failure(spec, kind, exc)) from exc
    if tokenizer is None:
        raise ModelLoadError(
            f"{spec}: the tokenizer recorded in the checkpoint ({info.get('tokenizer')!r}) does not load here; "
            "export it with `align export CKPT OUT --tokenizer NAME_OR_PATH` and evaluate the folder"
        )
    return model, tokenizer, dict(info.get("prompts") or {})


def _folder_prompts(path: Path) -> dict[str, str]:
    """The prompts of a sentence-transformers export (``config_sentence_transformers.json``), if any."""
    file = path / "config_sentence_transformers.json"
    try:
        prompts = json.loads(file.read_text(encoding="utf-8")).get("prompts") if file.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in prompts.items()} if isinstance(prompts, dict) else {}


def _prefixes(card: dict, prompts: Mapping[str, str]) -> tuple[str, str]:
    """``(query prefix, passage prefix)``: the encoder meta first, then sentence-transformers prompts."""
    query = card.get("query_prefix") or prompts.get("query", "")
    passage = card.get("passage_prefix") or prompts.get("passage") or prompts.get("document", "")
    return str(query), str(passage)


def load_encoder(
    spec: str | os.PathLike, *, device: str | torch.device = "cpu", pooling: str | None = None
) -> tuple[DualEncoder, Any, EncoderInfo]:
    """Load a model spec (see the module docstring) as ``(DualEncoder, tokenizer, EncoderInfo)``.

    Args:
        device: where the model goes; on CPU it is cast to fp32.
        pooling: override the pooling (default: the encoder meta's, else ``mean``).

    The model is returned in eval mode with gradients disabled.

    Raises:
        ModelLoadError: the spec does not load (names it, what it looked like,
            and, offline, that hub names cannot be fetched).
        NotImplementedError: a checkpoint while ``alignment.export`` is unavailable.
        ValueError: ``pooling`` is not one of :data:`~alignment.model.POOLINGS`.
    """
    if pooling is not None and pooling not in POOLINGS:
        raise ValueError(f"--pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    text = os.fspath(spec)
    kind = classify_spec(text)
    card = read_card(Path(text)) if kind == "alignment-folder" else {}
    prompts = _folder_prompts(Path(text)) if kind in ("alignment-folder", "hf-folder") else {}
    if kind in ("lightning-checkpoint", "deepspeed-checkpoint"):
        model, tokenizer, prompts = _load_checkpoint(text, kind)
        if pooling is not None:
            model.pooling = pooling
    else:
        knobs = {"pooling": pooling} if pooling else {}
        if kind != "alignment-folder":
            knobs = {"pooling": pooling or "mean", "normalize": True}
        try:
            from transformers import AutoTokenizer

            model = DualEncoder.from_pretrained(text, **knobs)
            tokenizer = AutoTokenizer.from_pretrained(text)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelLoadError(describe_failure(text, kind, exc)) from exc
    model = model.to(device)
    if torch.device(device).type == "cpu":
        model = model.float()  # fp32 on CPU: bf16/fp16 matmuls there are slow and lose digits
    model.eval().requires_grad_(False)
    query_prefix, passage_prefix = _prefixes(card, prompts)
    info = EncoderInfo(
        spec=text,
        kind=kind,
        pooling=model.pooling,
        normalize=model.normalize,
        embedding_dim=model.embedding_dim,
        query_prefix=query_prefix,
        passage_prefix=passage_prefix,
        max_positions=encoder_max_positions(model),
        card=card,
    )
    return model, tokenizer, info
