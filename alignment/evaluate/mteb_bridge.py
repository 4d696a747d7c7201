"""The MTEB bridge: run MTEB on any model spec, and say up front why it cannot run.

:func:`sentence_transformer_from_spec` rebuilds the encoder of
:func:`~alignment.evaluate.encoder.load_encoder` as a
``sentence_transformers.SentenceTransformer`` (Transformer, Pooling, Dense
projection, Normalize, prompts) so MTEB can run it; :func:`mteb_problems` lists
what stops MTEB from running here (package missing, offline), and :func:`run_mteb`
runs the tasks.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from alignment.evaluate.encoder import (
    OFFLINE_VARS,
    ModelLoadError,
    classify_spec,
    describe_failure,
    is_offline,
    read_card,
)
from alignment.model import PROJECTION_FILE

MTEB_INSTALL_HINT = "pip install 'multiway-align[mteb]'"
_ST_POOLING = {"mean": "mean", "cls": "cls", "last": "lasttoken"}  # our pooling -> sentence-transformers mode


class MtebUnavailableError(RuntimeError):
    """MTEB cannot run here: not installed, or its data cannot be downloaded."""


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
    prefixes as the ``query`` / ``passage`` / ``document`` prompts and ``query`` the default prompt (as
    ``align export`` writes it; what ``align eval`` uses on its symmetric tasks, and what MTEB then gets
    for bitext mining and STS, which ask for no prompt type).

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
        card = read_card(path)
        if card and not card.get("share_encoder", True):
            raise ModelLoadError(
                f"{text}: this encoder has a separate pivot tower, which one sentence-transformers pipeline "
                "cannot express; evaluate it with `align eval --data` instead"
            )
        prompts = _prompts(card)
        default = "query" if prompts and prompts["query"] else None  # align eval's prefix on symmetric tasks
        return SentenceTransformer(modules=_st_pipeline(path, card, pooling), device=device, prompts=prompts,
                                   default_prompt_name=default)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(describe_failure(text, kind, exc)) from exc


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


def mteb_problems(environ: Mapping[str, str] | None = None, *, hub: bool = True) -> list[str]:
    """Why MTEB cannot run here (empty when it can be tried): not installed, and/or offline.

    ``hub``: hub tasks are asked for (their data is downloaded); tasks built from local data
    (``--mteb_local``) need no network, so being offline is no problem for them. Both are checked
    before anything is loaded, so ``align eval --mteb`` fails in a second rather than after encoding.
    """
    env = os.environ if environ is None else environ
    problems = []
    if importlib.util.find_spec("mteb") is None:
        problems.append(f"MTEB is not installed; install the optional extra: {MTEB_INSTALL_HINT}")
    if hub and is_offline(env):
        set_vars = ", ".join(f"{v}={env[v]}" for v in OFFLINE_VARS if env.get(v))
        problems.append(
            f"MTEB downloads its task data from the Hugging Face hub, which cannot be reached offline ({set_vars}); "
            "run `align eval --mteb` on a machine that can reach the hub, with those variables unset "
            "(`--mteb_local FILE` runs MTEB offline on local data)"
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


@dataclass(frozen=True)
class MtebScore:
    """One MTEB result: the main score of ``task`` on one subset (a language pair, ``default``) and split."""

    task: str
    subset: str
    split: str
    metric: str
    score: float
    file: str
    """MTEB's result JSON holding it, relative to the ``--out`` folder's ``mteb/``."""


def run_mteb(
    spec: str | os.PathLike,
    tasks: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    local: Sequence = (),
    batch_size: int = 64,
    device: str = "cpu",
    pooling: str | None = None,
) -> list[MtebScore]:
    """Run MTEB ``tasks`` (hub names) and ``local`` task objects on the encoder of ``spec``.

    One ``mteb.evaluate`` call runs both, so tasks built from local data
    (:func:`alignment.evaluate.mteb_local.local_tasks`) take the path hub tasks take: the same model
    wrapper, evaluators and result files. MTEB writes its own result JSON under
    ``out_dir/results/<model>/<revision>/<task>.json``; every run re-evaluates (``overwrite_strategy``
    always), so the files always describe this run. ``out_dir/mteb_scores.json`` lists the main scores.
    mteb 1.x (``mteb.MTEB(tasks).run``) still runs hub tasks.

    Raises:
        MtebUnavailableError: mteb is missing, the environment is offline and hub tasks are asked
            for, or the task data could not be downloaded (a network error).
        ModelLoadError: the model cannot be assembled as a SentenceTransformer.
    """
    problems = mteb_problems(hub=bool(tasks))
    if problems:
        raise MtebUnavailableError("; ".join(problems))
    import mteb

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = sentence_transformer_from_spec(spec, device=device, pooling=pooling)
    if not model.model_card_data.model_name:  # MTEB names the result folder after it
        model.model_card_data.model_name = Path(os.fspath(spec)).name or os.fspath(spec)
    try:
        selected = [*(mteb.get_tasks(tasks=list(tasks)) if tasks else []), *local]
        if hasattr(mteb, "evaluate"):
            result = mteb.evaluate(model, selected, cache=mteb.ResultCache(cache_path=str(out)),
                                   overwrite_strategy="always", encode_kwargs={"batch_size": batch_size},
                                   show_progress_bar=False)  # fmt: skip
            task_results = result.task_results
        else:
            if local:
                raise MtebUnavailableError(f"--mteb_local needs mteb >= 2 ({MTEB_INSTALL_HINT})")
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
    metric = {t.metadata.name: t.metadata.main_score for t in selected}
    scores = [score for r in task_results for score in _main_scores(r, out, metric.get(r.task_name, "main_score"))]
    (out / "mteb_scores.json").write_text(json.dumps([asdict(s) for s in scores], indent=2) + "\n")
    return scores


def _main_scores(result, out: Path, metric: str) -> list[MtebScore]:
    """The main score of every subset and split of one MTEB ``TaskResult``, with the file MTEB wrote."""
    found = sorted(out.glob(f"results/*/*/{result.task_name}.json"), key=lambda p: p.stat().st_mtime)
    file = str(found[-1].relative_to(out)) if found else ""
    return [
        MtebScore(result.task_name, entry.get("hf_subset", "default"), split, metric, float(entry["main_score"]), file)
        for split, entries in result.scores.items() for entry in entries
    ]  # fmt: skip
