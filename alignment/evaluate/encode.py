"""Load an encoder from any spec and embed text: batched, no gradients, deterministic.

Model specs (:func:`classify_spec`, :func:`load_encoder`):

* a folder written by :meth:`DualEncoder.save_pretrained <alignment.model.DualEncoder.save_pretrained>`
  or by the export (Hugging Face config + weights + tokenizer + ``alignment_encoder.json``,
  which records pooling, normalisation, projection and, for E5, the query/passage prefixes);
* a plain Hugging Face model folder or hub name: mean pooling + L2 normalisation
  unless ``pooling`` says otherwise (hub names need the network or the local cache);
* a Lightning checkpoint file (``*.ckpt``) or a DeepSpeed checkpoint folder:
  converted by ``alignment.export.encoder_from_checkpoint``.

Encoding (:func:`encode_texts`): the texts are tokenised in one fast-tokenizer
call, sorted by token length (longest first, ties by position) and cut into
batches, so each batch pads to nearly its own length; each batch runs under
``torch.inference_mode()`` in eval mode, fp32 on CPU, and the rows are put back
in input order. The result depends only on the texts and the settings, not on
their order. A tqdm bar shows progress on a terminal (never in logs or with ``quiet``).

:func:`encode_eval_data` and :func:`evaluate_encoded` carry an
:class:`~alignment.evaluate.datasets.EvalData` through encoding to
:class:`~alignment.evaluate.report.EvalResults`; NaN/inf or zero-norm embeddings are
dropped, counted per language and shown in the report, never scored.

The MTEB bridge (:func:`sentence_transformer_from_spec`, :func:`run_mteb`) rebuilds the
same encoder as a ``sentence_transformers.SentenceTransformer`` (Transformer, Pooling,
Dense projection, Normalize, prompts) so MTEB can run it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from alignment.data.collate import pad_sequences, tokenize
from alignment.evaluate.datasets import EvalData
from alignment.evaluate.report import EvalConfig, EvalResults, evaluate_embeddings
from alignment.evaluate.retrieval import MultiWayEmbeddings, invalid_vectors, training_language_tuple
from alignment.languages import DEFAULT_PIVOT
from alignment.model import ENCODER_META, POOLINGS, PROJECTION_FILE, DualEncoder, max_positions

SPEC_KINDS = ("alignment-folder", "hf-folder", "hub", "lightning-checkpoint", "deepspeed-checkpoint")
"""What a model spec can be (:func:`classify_spec`)."""
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
"""Environment variables that forbid downloads from the Hugging Face hub."""
MTEB_INSTALL_HINT = "pip install 'multiway-align[mteb]'"
_ST_POOLING = {"mean": "mean", "cls": "cls", "last": "lasttoken"}  # our pooling -> sentence-transformers mode


class ModelLoadError(RuntimeError):
    """A model spec that does not load: the message names it, what it looked like, and why."""


class MtebUnavailableError(RuntimeError):
    """MTEB cannot run here: not installed, or its data cannot be downloaded."""


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


def _read_card(path: Path) -> dict:
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


def _describe_failure(spec: str, kind: str, exc: BaseException) -> str:
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


def _max_positions(model: DualEncoder) -> int | None:
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
        raise ModelLoadError(_describe_failure(spec, kind, exc)) from exc
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
    card = _read_card(Path(text)) if kind == "alignment-folder" else {}
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
            raise ModelLoadError(_describe_failure(text, kind, exc)) from exc
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
        max_positions=_max_positions(model),
        card=card,
    )
    return model, tokenizer, info


# --------------------------------------------------------------------------- encoding


@dataclass
class EncodeConfig:
    """How text becomes embeddings (``--batch-size``, ``--max-length``, ``--prefix``, ``--seed``, ``--quiet``)."""

    batch_size: int = 64
    """Sentences per forward pass; peak memory grows with batch_size x max_length."""
    max_length: int = 128
    """Longest input in tokens (specials included); longer sentences are truncated. Capped at the model's positions."""
    prefix: str | None = None
    """Text prepended to every sentence; unset takes the passage prefix recorded with the encoder
    (E5: 'passage: '), an empty string disables it."""
    seed: int = 0
    """Seed set before encoding (models in eval mode draw no random numbers; this pins anything that does)."""
    quiet: bool = False
    """No progress bars."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_length < 2:
            raise ValueError(f"--max-length must be >= 2 (room for the special tokens), got {self.max_length}")


def resolve_prefix(info: EncoderInfo, override: str | None) -> str:
    """The prefix to apply: ``override`` when given, else the query prefix.

    Every task here is symmetric (both sides are sentences of the same kind), and E5's card says to
    use ``"query: "`` on both sides for symmetric tasks (bitext mining, STS, paraphrase retrieval).
    It is also what ``configs/demo.yaml`` trains with, so before/after evaluations compare alike.
    """
    return info.query_prefix if override is None else override


def progress_enabled(quiet: bool, stream: IO | None = None) -> bool:
    """Progress bars only on an interactive terminal and when not ``quiet``: logs stay clean."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return not quiet and bool(isatty and isatty())


def quiet_library_bars(config: EncodeConfig, stream: IO | None = None) -> None:
    """Turn off transformers' own progress bars (weight loading) when ours are off: logs stay clean.

    Process-wide (transformers keeps it in a module global); meant for the ``align`` commands.
    """
    if not progress_enabled(config.quiet, stream):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def length_order(lengths: Sequence[int]) -> list[int]:
    """Indices by descending length, ties by position: stable, so batching is deterministic.

    Longest first means the first batch is the most expensive one, so an
    out-of-memory error shows at once rather than at the end.
    """
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def _model_device(model: DualEncoder) -> torch.device:
    return next(model.parameters()).device


def encode_texts(
    model: DualEncoder,
    tokenizer: Any,
    texts: Sequence[str],
    config: EncodeConfig | None = None,
    *,
    prefix: str = "",
    pivot: bool = False,
    desc: str = "encoding",
    stream: IO | None = None,
) -> Tensor:
    """Embed ``texts``: ``(N, D)`` float32 on CPU, row ``i`` the embedding of ``texts[i]``.

    Args:
        prefix: prepended to every text before tokenisation (E5's ``"passage: "``).
        pivot: use the pivot tower of a non-shared encoder.
        desc, stream: the progress bar's label and output (stderr by default).

    Cost: one tokenizer call for all texts, then ``ceil(N / batch_size)`` forward
    passes; each batch's embeddings are copied to the host (a device sync per batch).
    """
    from tqdm.auto import tqdm

    config = config or EncodeConfig()
    out = torch.empty(len(texts), model.embedding_dim, dtype=torch.float32)  # (N, D)
    if not texts:
        return out
    limit = min(config.max_length, _max_positions(model) or config.max_length)
    ids = tokenize(tokenizer, list(texts), max_length=limit, prefix=prefix)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out either way
    order = length_order([len(seq) for seq in ids])
    device = _model_device(model)
    was_training = model.training
    model.eval()
    torch.manual_seed(config.seed)
    show = progress_enabled(config.quiet, stream)
    bar = tqdm(total=len(texts), desc=desc, unit="sent", file=stream, disable=not show)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), config.batch_size):
                index = order[start : start + config.batch_size]
                input_ids, mask = pad_sequences([ids[i] for i in index], pad_id)  # (b, T), (b, T)
                emb = model.encode(input_ids.to(device), mask.to(device), pivot=pivot)  # (b, D)
                out[torch.tensor(index)] = emb.float().cpu()  # host copy: a sync point per batch
                bar.update(len(index))
    finally:
        bar.close()
        model.train(was_training)
    return out


def _encode_by_tower(
    model: DualEncoder,
    tokenizer: Any,
    texts: Sequence[str],
    languages: Sequence[str],
    config: EncodeConfig,
    *,
    prefix: str,
    pivot: str,
    desc: str,
) -> Tensor:
    """Embed mixed-language ``texts`` ``(N, D)``; pivot-language texts go through the pivot tower
    when the encoder has one, so every sentence is embedded as in training."""
    if model.pivot_backbone is None:
        return encode_texts(model, tokenizer, texts, config, prefix=prefix, desc=desc)
    out = torch.empty(len(texts), model.embedding_dim)  # (N, D)
    for is_pivot in (True, False):
        index = [i for i, lang in enumerate(languages) if (lang == pivot) == is_pivot]
        if index:
            part = encode_texts(
                model, tokenizer, [texts[i] for i in index], config, prefix=prefix, pivot=is_pivot,
                desc=f"{desc} ({'pivot' if is_pivot else 'other'} tower)",
            )
            out[torch.tensor(index)] = part
    return out


# --------------------------------------------------------------------------- evaluation data -> results


@dataclass
class EncodedEvalData:
    """Embeddings of an :class:`~alignment.evaluate.datasets.EvalData`, ready for the metrics.

    Attributes:
        embeddings: the translation rows (invalid vectors dropped and counted), or None.
        sts_sets: name -> ``(a (n, D), b (n, D), gold (n,))`` per language pair of scored pairs.
        row_labels: row id -> label for classification transfer, or None.
        pair_embeddings: the scored pairs' sentences, each its own row, for the projection plot.
        invalid: NaN/inf and zero-norm counts per language (rows and pairs).
        num_pairs: scored pairs read.
        num_sentences: sentences encoded.
        seconds: wall time of the encoding.
    """

    embeddings: MultiWayEmbeddings | None
    sts_sets: dict[str, tuple[Tensor, Tensor, Tensor]]
    row_labels: dict[str, str] | None
    pair_embeddings: MultiWayEmbeddings | None
    invalid: dict[str, dict[str, int]]
    num_pairs: int
    num_sentences: int
    seconds: float

    @property
    def sentences_per_second(self) -> float:
        return self.num_sentences / self.seconds if self.seconds > 0 else float("nan")

    @property
    def num_invalid(self) -> int:
        return sum(sum(kinds.values()) for kinds in self.invalid.values())


def _count_invalid(vectors: Tensor, languages: Sequence[str]) -> tuple[Tensor, dict[str, dict[str, int]]]:
    """``(valid mask (N,), per-language counts)`` of NaN/inf and zero-norm rows."""
    non_finite, zero = invalid_vectors(vectors)
    counts: dict[str, dict[str, int]] = {}
    for kind, idx in (("non_finite", non_finite), ("zero_norm", zero)):
        for i in idx.tolist():
            counts.setdefault(languages[i], {"non_finite": 0, "zero_norm": 0})[kind] += 1
    valid = torch.ones(len(languages), dtype=torch.bool)
    valid[torch.cat([non_finite, zero]).cpu()] = False
    return valid, counts


def _sts_sets(data: EvalData, vectors: Tensor, valid: Tensor) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Scored pairs grouped by language pair; a pair with an invalid side is left out (it is counted).

    ``vectors`` ``(2P, D)`` holds pair ``i``'s sentences at rows ``2i`` (a) and ``2i + 1`` (b).
    """
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(data.pairs):
        groups.setdefault(pair.language_pair, []).append(i)
    sets = {}
    for lang_pair, index in groups.items():
        rows = torch.tensor(index)  # (n,)
        keep = valid[2 * rows] & valid[2 * rows + 1]  # (n,)
        gold = torch.tensor([data.pairs[i].score for i in index], dtype=torch.float64)[keep]
        sets[f"{data.name} {lang_pair}"] = (vectors[2 * rows[keep]], vectors[2 * rows[keep] + 1], gold)
    return sets


def encode_eval_data(
    model: DualEncoder,
    tokenizer: Any,
    data: EvalData,
    config: EncodeConfig | None = None,
    *,
    prefix: str = "",
    pivot: str = DEFAULT_PIVOT,
) -> EncodedEvalData:
    """Embed every sentence of ``data`` in one length-sorted pass (two with a separate pivot tower).

    Translation rows become a :class:`MultiWayEmbeddings` with ``on_invalid="drop"``;
    scored pairs become STS sets, one per language pair. Invalid embeddings
    (NaN/inf, zero norm) are never scored: they are dropped and counted in
    :attr:`EncodedEvalData.invalid`, which the report shows.
    """
    config = config or EncodeConfig()
    row_ids = [row.id for row in data.rows for _ in row.texts]
    langs = [lang for row in data.rows for lang in row.texts]
    texts = [text for row in data.rows for text in row.texts.values()]
    for i, pair in enumerate(data.pairs):  # pair i -> sentences 2i (a) and 2i + 1 (b) after the rows
        row_ids += [f"pair{i}:a", f"pair{i}:b"]
        langs += [pair.lang_a, pair.lang_b]
        texts += [pair.text_a, pair.text_b]
    start = time.perf_counter()
    vectors = _encode_by_tower(model, tokenizer, texts, langs, config, prefix=prefix, pivot=pivot, desc=data.name)
    seconds = time.perf_counter() - start  # (N, D) above; CPU tensors, so no pending device work
    valid, invalid = _count_invalid(vectors, langs)
    n_rows = sum(len(row.texts) for row in data.rows)
    emb = None
    if data.rows:
        emb = MultiWayEmbeddings(vectors[:n_rows], row_ids[:n_rows], langs[:n_rows], pivot, on_invalid="drop")
    sts, pair_emb = {}, None
    if data.pairs:
        sts = _sts_sets(data, vectors[n_rows:], valid[n_rows:])
        pair_emb = MultiWayEmbeddings(vectors[n_rows:], row_ids[n_rows:], langs[n_rows:], pivot, on_invalid="drop")
    return EncodedEvalData(
        embeddings=emb,
        sts_sets=sts,
        row_labels=data.labels,
        pair_embeddings=pair_emb,
        invalid=invalid,
        num_pairs=len(data.pairs),
        num_sentences=len(texts),
        seconds=seconds,
    )


def evaluate_encoded(
    encoded: EncodedEvalData,
    config: EvalConfig | None = None,
    *,
    training_languages: Iterable[str] | None = None,
    meta: Mapping | None = None,
) -> tuple[EvalResults, MultiWayEmbeddings | None]:
    """Run the evaluation suite; returns the results and the embeddings to project in the report.

    Translation rows get retrieval, xSIM, diagnostics, hubness, transfer (when
    labelled) and Procrustes (when configured); scored pairs get Spearman STS.
    A scored-pair-only set gets STS alone.
    """
    from alignment.evaluate.probes import sts_spearman

    emb = encoded.embeddings
    if emb is not None:
        res = evaluate_embeddings(
            emb,
            config,
            training_languages=training_languages,
            row_labels=encoded.row_labels,
            sts_sets=encoded.sts_sets or None,
            meta=meta,
        )
    else:
        pairs = encoded.pair_embeddings
        assert pairs is not None, "EncodedEvalData holds neither rows nor scored pairs"
        res = EvalResults(
            languages=pairs.language_codes,
            pivot=pairs.pivot,
            num_rows=encoded.num_pairs,
            num_sentences=encoded.num_sentences,
            training_languages=training_language_tuple(training_languages),
            meta=dict(meta or {}),
        )
        res.sts = [sts_spearman(a, b, gold, name=name) for name, (a, b, gold) in encoded.sts_sets.items()]
    res.invalid = dict(sorted(encoded.invalid.items()))
    return res, emb if emb is not None else encoded.pair_embeddings


# --------------------------------------------------------------------------- sentence-transformers and MTEB


def _st_modules():
    """sentence-transformers' module classes (the 6.x layout, else the 3.x-5.x ``models`` package)."""
    try:
        from sentence_transformers.base.modules import Dense, Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:
        from sentence_transformers.models import Dense, Normalize, Pooling, Transformer
    return Transformer, Pooling, Dense, Normalize


def sentence_transformer_from_spec(spec: str | os.PathLike, *, device: str = "cpu", pooling: str | None = None):
    """The encoder of ``spec`` as a ``SentenceTransformer`` (what MTEB runs).

    A folder with ``modules.json`` (a sentence-transformers export) and a hub
    name load as they are. An encoder folder or plain Hugging Face folder is
    assembled from modules so that it embeds exactly as :func:`encode_texts`:
    Transformer -> Pooling (mean / cls / lasttoken) -> Dense projection (no bias,
    identity activation, the saved weights) -> Normalize, with the meta's E5
    prefixes as the ``query`` / ``passage`` / ``document`` prompts.

    Raises:
        ModelLoadError: a training checkpoint (export it first), an encoder with
            a separate pivot tower (not one pipeline), or a folder that does not load.
    """
    from sentence_transformers import SentenceTransformer

    text = os.fspath(spec)
    kind = classify_spec(text)
    if kind in ("lightning-checkpoint", "deepspeed-checkpoint"):
        raise ModelLoadError(f"{text}: a training checkpoint; export it to a folder first (`align export`)")
    path = Path(text)
    try:
        if kind == "hub" or (path / "modules.json").is_file():
            return SentenceTransformer(text, device=device)
        card = _read_card(path)
        if card and not card.get("share_encoder", True):
            raise ModelLoadError(
                f"{text}: this encoder has a separate pivot tower, which one sentence-transformers pipeline "
                "cannot express; evaluate it with `align eval --data` instead"
            )
        return SentenceTransformer(modules=_st_pipeline(path, card, pooling), device=device, prompts=_prompts(card))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_describe_failure(text, kind, exc)) from exc


def _st_pipeline(path: Path, card: dict, pooling: str | None) -> list:
    Transformer, Pooling, Dense, Normalize = _st_modules()
    transformer = Transformer(str(path))
    # sentence-transformers 6 renamed get_word_embedding_dimension (3.x-5.x) to get_embedding_dimension
    dim = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
    hidden = dim()
    mode = pooling or card.get("pooling", "mean")
    modules = [transformer, Pooling(hidden, _ST_POOLING[mode])]
    if card.get("projection_dim"):
        from safetensors.torch import load_file

        weight = load_file(str(path / PROJECTION_FILE))["weight"]  # (D, H), as nn.Linear stores it
        modules.append(Dense(hidden, weight.shape[0], bias=False, activation_function=torch.nn.Identity(),
                             init_weight=weight))
    if card.get("normalize", True):
        modules.append(Normalize())
    return modules


def _prompts(card: dict) -> dict[str, str] | None:
    query, passage = card.get("query_prefix", ""), card.get("passage_prefix", "")
    if not (query or passage):
        return None
    return {"query": query, "passage": passage, "document": passage}


def mteb_problems(environ: Mapping[str, str] | None = None) -> list[str]:
    """Why MTEB cannot run here (empty when it can be tried): not installed, and/or offline.

    Both are checked before anything is loaded, so ``align eval --mteb`` fails
    in a second rather than after encoding.
    """
    env = os.environ if environ is None else environ
    problems = []
    if importlib.util.find_spec("mteb") is None:
        problems.append(f"MTEB is not installed; install the optional extra: {MTEB_INSTALL_HINT}")
    if is_offline(env):
        set_vars = ", ".join(f"{v}={env[v]}" for v in OFFLINE_VARS if env.get(v))
        problems.append(
            f"MTEB downloads its task data from the Hugging Face hub, which cannot be reached offline ({set_vars}); "
            "run `align eval --mteb` on a machine that can reach the hub, with those variables unset"
        )
    return problems


_NETWORK_ERRORS = {
    "ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "TimeoutError", "ConnectError",
    "NewConnectionError", "NameResolutionError", "MaxRetryError", "gaierror", "URLError",
    "OfflineModeIsEnabled", "LocalEntryNotFoundError",
}  # fmt: skip
_NETWORK_PHRASES = ("couldn't connect", "offline mode", "connection refused", "name or service not known")


def is_network_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) means the hub or a data host could not be reached."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if any(cls.__name__ in _NETWORK_ERRORS for cls in type(exc).__mro__):
            return True
        if any(phrase in str(exc).lower() for phrase in _NETWORK_PHRASES):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def run_mteb(
    spec: str | os.PathLike,
    tasks: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 64,
    device: str = "cpu",
    pooling: str | None = None,
) -> dict[str, float]:
    """Run MTEB ``tasks`` on the encoder of ``spec``; results under ``out_dir``; main score per task.

    mteb >= 2: ``mteb.evaluate(model, mteb.get_tasks(tasks=...), cache=ResultCache(out_dir))``;
    mteb 1.x: ``mteb.MTEB(tasks=...).run(model, output_folder=out_dir)``.

    Raises:
        MtebUnavailableError: mteb is missing, the environment is offline, or the
            task data could not be downloaded (a network error).
        ModelLoadError: the model cannot be assembled as a SentenceTransformer.
    """
    problems = mteb_problems()
    if problems:
        raise MtebUnavailableError("; ".join(problems))
    import mteb

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = sentence_transformer_from_spec(spec, device=device, pooling=pooling)
    try:
        selected = mteb.get_tasks(tasks=list(tasks))
        if hasattr(mteb, "evaluate"):
            cache_cls = getattr(mteb, "ResultCache", None) or importlib.import_module("mteb.cache").ResultCache
            result = mteb.evaluate(
                model, selected, cache=cache_cls(cache_path=str(out)), encode_kwargs={"batch_size": batch_size}
            )
            task_results = result.task_results
        else:
            task_results = mteb.MTEB(tasks=selected).run(
                model, output_folder=str(out), encode_kwargs={"batch_size": batch_size}
            )
    except Exception as exc:
        if is_network_error(exc):
            raise MtebUnavailableError(
                f"MTEB could not download the data of {', '.join(tasks)} ({type(exc).__name__}: {exc}); "
                "run it where the Hugging Face hub can be reached"
            ) from exc
        raise
    scores = {r.task_name: float(r.get_score()) for r in task_results}
    (out / "mteb_scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    return scores
