"""Load an encoder from any model spec (:func:`classify_spec`, :func:`load_encoder`).

Model specs:

* a folder written by :meth:`DualEncoder.save_pretrained <alignment.model.DualEncoder.save_pretrained>`
  or by the export (Hugging Face config + weights + tokenizer + ``alignment_encoder.json``,
  which records pooling, normalisation, projection and, for E5, the query/passage prefixes);
* a plain Hugging Face model folder or hub name: mean pooling + L2 normalisation
  unless ``pooling`` says otherwise (hub names need the network or the local cache);
* a Lightning checkpoint file (``*.ckpt``) or a DeepSpeed checkpoint folder:
  converted by ``alignment.export.encoder_from_checkpoint``;
* a sentence-transformers export with a ``Router`` module (language adapters, ``align export``; or the
  post-hoc maps ``align fit-map --export`` carries): loaded as a :class:`RouterEncoder`, which encodes each
  language with ``SentenceTransformer(folder).encode(texts, task=<language>)``, the export's own routing.

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


# --------------------------------------------------------------------------- Router exports

ROUTER_SUFFIX = ".Router"


def router_position(path: Path) -> int | None:
    """Index of the ``Router`` module in a sentence-transformers folder's ``modules.json``; None without one.

    0: a language-adapter export (each route is an encoder); after the pooling: post-hoc maps."""
    file = path / "modules.json"
    if not file.is_file():
        return None
    try:
        modules = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    found = [i for i, m in enumerate(modules) if isinstance(m, dict) and str(m.get("type", "")).endswith(ROUTER_SUFFIX)]
    return found[0] if found else None


class RouterEncoder(torch.nn.Module):
    """A sentence-transformers export whose ``Router`` picks the route by language (``task=<language code>``).

    :func:`alignment.evaluate.encode.encode_texts` hands it each language's sentences at once
    (:meth:`encode_language`), so evaluation embeds exactly as ``SentenceTransformer(folder).encode(texts,
    task=lang)``. A language without a route takes the Router's default route (language adapters: the
    ``default`` adapter); a Router without one (post-hoc maps) refuses it (:meth:`check_language`)."""

    pivot_backbone = None

    def __init__(self, st: Any, spec: str):
        super().__init__()
        from sentence_transformers.base.modules import Router

        self.st = st
        self.spec = spec
        self.router = next(m for m in st.modules() if isinstance(m, Router))
        self.embedding_dim = int(getattr(st, "get_embedding_dimension", st.get_sentence_embedding_dimension)())
        pool = next((m for m in st.modules() if type(m).__name__ == "Pooling"), None)
        mode = getattr(pool, "pooling_mode", "mean") if pool is not None else "mean"
        self.pooling = {"lasttoken": "last"}.get(mode, mode)
        self.normalize = any(type(m).__name__ == "Normalize" for m in st.modules())

    @property
    def routes(self) -> list[str]:
        return list(self.router.sub_modules)

    def check_language(self, language: str | None) -> None:
        """Raise ValueError, before any encoding, when ``language`` has no route and the Router no default."""
        try:
            route = self.router._resolve_route(task=language)  # sentence-transformers' own resolution
        except ValueError:
            route = None
        if route is None:
            what = f"language {language!r}" if language else "sentences without a language (no task)"
            raise ValueError(
                f"--model {self.spec}: the export routes by language (a sentence-transformers Router with routes "
                f"{', '.join(self.routes)} and no default route): it cannot encode {what}. Maps exports refuse "
                "languages they hold no map for: fit maps for it (align fit-map) or leave it out (--languages)"
            )

    def max_positions(self) -> int | None:
        return min((p for m in self.st.modules() if (p := max_positions_of(m)) is not None), default=None)

    def fingerprint(self) -> str:
        """``sha256:<hex>`` over every parameter of the export (the identity ``align fit-map`` records)."""
        import hashlib

        digest = hashlib.sha256()
        for name, param in sorted(self.st.state_dict().items()):
            digest.update(name.encode() + str(tuple(param.shape)).encode())
            digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return "sha256:" + digest.hexdigest()

    def encode_language(self, texts: list[str], language: str | None, *, batch_size: int, max_length: int,
                        prefix: str = "") -> torch.Tensor:
        """``(N, D)`` float32 on CPU: ``SentenceTransformer.encode(texts, task=language)`` with ``prefix`` as the
        prompt, at most ``max_length`` tokens per sentence."""
        self.check_language(language)
        limit = self.max_positions()
        self.st.max_seq_length = min(max_length, limit) if limit else max_length
        kwargs = {"task": language} if language is not None else {}
        with torch.inference_mode():
            out = self.st.encode(list(texts), batch_size=batch_size, prompt=prefix or None, convert_to_tensor=True,
                                 show_progress_bar=False, **kwargs)
        return out.float().cpu()


def max_positions_of(module: torch.nn.Module) -> int | None:
    model = getattr(module, "auto_model", None)
    return max_positions(model.config) if model is not None else None


def _load_router(text: str, device: str | torch.device, pooling: str | None, card: dict) -> RouterEncoder:
    if pooling is not None:
        raise ValueError(f"--pooling does not apply to {text}: a sentence-transformers Router export pools as written")
    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(text, device=str(device))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(describe_failure(text, "alignment-folder" if card else "hf-folder", exc)) from exc
    return RouterEncoder(st, text)


def load_encoder(
    spec: str | os.PathLike, *, device: str | torch.device = "cpu", pooling: str | None = None,
    carried_maps: bool = True,
) -> tuple[DualEncoder | RouterEncoder, Any, EncoderInfo]:
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

    A sentence-transformers export with a ``Router`` module loads as a :class:`RouterEncoder` (each language
    through its route); with ``carried_maps=False`` a maps export (Router after the pooling) loads as its
    base encoder, without the maps (``align eval --maps`` and ``align fit-map`` apply or fit maps themselves).
    """
    if pooling is not None and pooling not in POOLINGS:
        raise ValueError(f"--pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    text = os.fspath(spec)
    kind = classify_spec(text)
    card = read_card(Path(text)) if kind == "alignment-folder" else {}
    prompts = _folder_prompts(Path(text)) if kind in ("alignment-folder", "hf-folder") else {}
    position = router_position(Path(text)) if kind in ("alignment-folder", "hf-folder") else None
    if position is not None and (carried_maps or position == 0):
        model = _load_router(text, device, pooling, card)
        query_prefix, passage_prefix = _prefixes(card, prompts)
        info = EncoderInfo(spec=text, kind=kind, pooling=model.pooling, normalize=model.normalize,
                           embedding_dim=model.embedding_dim, query_prefix=query_prefix, passage_prefix=passage_prefix,
                           max_positions=model.max_positions(), card=card)
        return model, model.st.tokenizer, info
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
