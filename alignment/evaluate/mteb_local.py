"""MTEB tasks built from local data (``align eval --mteb_local``), run by MTEB's own evaluators.

:func:`local_tasks` turns an :class:`~alignment.evaluate.datasets.EvalData` (any file ``--data`` reads:
a shard build's held-out split, a TSV or a JSONL) into MTEB custom tasks whose ``load_data`` hands
MTEB in-memory ``datasets`` instead of downloading from the Hugging Face hub:

``LocalBitextMining``
    translation rows; one subset per ordered language pair (``de-en`` as in ``align eval``'s tables,
    ``--retrieval.pairs`` all or pivot), each the rows holding both languages as ``sentence1`` (queries)
    and ``sentence2`` (candidates). MTEB's main score is cosine nearest-neighbour accuracy, the
    same quantity as ``align eval``'s ``retrieval_acc/<src>-<tgt>``.
``LocalSTS``
    scored pairs; one subset per language pair, main score the Spearman correlation of cosine
    similarity with the gold scores (``align eval``'s ``sts_spearman/<pair>``).

The tasks go through :func:`alignment.evaluate.mteb_bridge.run_mteb` with any hub task names, so
they are evaluated, cached and written (MTEB's result JSON) exactly as Tatoeba or STS22 are. Labelled
rows are evaluated as bitext only: MTEB's classification protocol (a logistic regression on a train
split, resampled) is not what ``align eval``'s transfer probe measures, so no local classification
task is built.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from alignment.evaluate.datasets import EvalData

BITEXT_TASK = "LocalBitextMining"
STS_TASK = "LocalSTS"
LOCAL_TASKS = (BITEXT_TASK, STS_TASK)
"""Names of the tasks :func:`local_tasks` builds (their result files are ``<name>.json``)."""


def mteb_language(code: str) -> str:
    """A BCP-47 code as MTEB's ``<ISO 639-3>-<ISO 15924 script>`` (``de`` -> ``deu-Latn``, ``zh-Hant`` -> ``zho-Hant``).

    Languages or scripts MTEB does not list fall back to ``und`` / ``Zzzz`` (undetermined, unknown).
    """
    import langcodes
    from mteb.languages import ISO_TO_LANGUAGE, ISO_TO_SCRIPT

    lang = langcodes.Language.get(code)
    try:
        alpha3 = lang.to_alpha3()
    except LookupError:
        alpha3 = "und"
    script = lang.script or lang.maximize().script or "Zzzz"
    alpha3 = alpha3 if alpha3 in ISO_TO_LANGUAGE else "und"
    return f"{alpha3}-{script if script in ISO_TO_SCRIPT else 'Zzzz'}"


def _fingerprint(payload: Any) -> str:
    """A short content hash of the task data, recorded as the dataset revision in MTEB's result files."""
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]


Subsets = dict[str, tuple[tuple[str, str], dict[str, list]]]
"""Subset key ``<lang_a>-<lang_b>`` -> (its two languages, its columns)."""


def bitext_subsets(data: EvalData, pairs: str = "all", pivot: str | None = None) -> Subsets:
    """Per ordered pair ``src-tgt``: the rows holding both languages as ``sentence1`` (src) and ``sentence2`` (tgt).

    ``pairs``: ``"all"`` ordered pairs of distinct languages or ``"pivot"`` (each language to and from
    ``pivot``), as ``--retrieval.pairs``; pairs that share no row are left out.
    """
    langs = data.languages
    if pairs == "pivot":
        todo = [p for lang in langs if lang != pivot for p in ((lang, pivot), (pivot, lang))]
    else:
        todo = [(s, t) for s in langs for t in langs if s != t]
    out = {}
    for src, tgt in todo:
        both = [row.texts for row in data.rows if src in row.texts and tgt in row.texts]
        if both:
            out[f"{src}-{tgt}"] = ((src, tgt), {"sentence1": [t[src] for t in both], "sentence2": [t[tgt] for t in both]})
    return out


def sts_subsets(data: EvalData) -> Subsets:
    """Per language pair ``a-b``: its scored pairs as ``sentence1``, ``sentence2``, ``score``."""
    out: Subsets = {}
    for pair in data.pairs:
        _, sub = out.setdefault(pair.language_pair, ((pair.lang_a, pair.lang_b),
                                                     {"sentence1": [], "sentence2": [], "score": []}))
        sub["sentence1"].append(pair.text_a)
        sub["sentence2"].append(pair.text_b)
        sub["score"].append(float(pair.score))
    return out


def _metadata(name: str, kind: str, main_score: str, data: EvalData, subsets: Subsets, description: str):
    from mteb.abstasks.task_metadata import TaskMetadata

    return TaskMetadata(
        name=name, type=kind, main_score=main_score, description=description, reference=None,
        dataset={"path": data.spec, "revision": _fingerprint({k: cols for k, (_, cols) in subsets.items()})},
        category="t2t", eval_splits=["test"], modalities=["text"],
        eval_langs={key: [mteb_language(lang) for lang in langs] for key, (langs, _) in subsets.items()},
        date=None, dialect=None, domains=None, task_subtypes=None, license=None, annotations_creators=None,
        sample_creation=None, bibtex_citation=None,
    )  # fmt: skip


def check_local(data: EvalData, *, pairs: str = "all", pivot: str | None = None) -> None:
    """What :func:`local_tasks` refuses, checked without MTEB (``align eval`` calls it before anything runs).

    Raises:
        ValueError: the rows share no language pair (nothing to mine), or every gold score is the same.
    """
    if data.rows and not bitext_subsets(data, pairs, pivot):
        raise ValueError(f"--mteb_local {data.spec}: no language pair of --retrieval.pairs {pairs} (pivot {pivot}) "
                         f"shares a row (languages: {', '.join(data.languages)}), so there is no bitext to mine")
    scores = [pair.score for pair in data.pairs or ()]
    if scores and min(scores) == max(scores):
        raise ValueError(f"--mteb_local {data.spec}: every gold score is {scores[0]}, so Spearman is undefined")


def local_tasks(data: EvalData, *, pairs: str = "all", pivot: str | None = None) -> list:
    """MTEB task objects for ``data``: :data:`BITEXT_TASK` for its rows, :data:`STS_TASK` for its scored pairs.

    Raises:
        ValueError: the rows share no language pair (nothing to mine), or every gold score is the same
            (:func:`check_local`).
    """
    check_local(data, pairs=pairs, pivot=pivot)
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.text.bitext_mining import AbsTaskBitextMining

    tasks = []
    if data.rows:
        bitext = bitext_subsets(data, pairs, pivot)
        meta = _metadata(BITEXT_TASK, "BitextMining", "accuracy", data, bitext,
                         f"Bitext mining on the translation rows of {data.spec} (built by align eval --mteb_local).")
        tasks.append(_task_class(AbsTaskBitextMining, meta, bitext)())
    if data.pairs:
        sts = sts_subsets(data)
        scores = [s for _, sub in sts.values() for s in sub["score"]]
        meta = _metadata(STS_TASK, "STS", "cosine_spearman", data, sts,
                         f"Semantic similarity on the scored pairs of {data.spec} (built by align eval --mteb_local).")
        cls = _task_class(AbsTaskSTS, meta, sts)
        cls.min_score, cls.max_score = min(scores), max(scores)  # MTEB rescales gold to [0, 1]; Spearman is unchanged
        tasks.append(cls())
    return tasks


def _task_class(base: type, metadata, subsets: Subsets) -> type:
    """A subclass of MTEB's ``base`` task whose ``load_data`` hands MTEB ``subsets`` from memory (no download)."""

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        from datasets import Dataset, DatasetDict

        self.dataset = {key: DatasetDict({"test": Dataset.from_dict(cols)}) for key, (_, cols) in subsets.items()}
        self.data_loaded = True

    return type(metadata.name, (base,), {"metadata": metadata, "load_data": load_data})

