"""The model card (``README.md`` with Hub metadata) of an exported encoder.

Built with ``huggingface_hub``'s ``ModelCard`` / ``ModelCardData`` from what
the run recorded (:func:`alignment.runs.describe_run`): base model and its
licence, languages, objective, data (shard spec and manifest sha256), steps,
and the last evaluation's metrics. Both export paths (the end of ``align fit``
and ``align export CKPT OUT``) write it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Licences of the recipes' base models (their Hub cards), used when the base's own card is not on disk.
KNOWN_LICENSES = {
    "xlm-roberta-base": "mit",
    "FacebookAI/xlm-roberta-base": "mit",
    "bert-base-multilingual-cased": "apache-2.0",
    "google-bert/bert-base-multilingual-cased": "apache-2.0",
    "sentence-transformers/LaBSE": "apache-2.0",
    "intfloat/multilingual-e5-small": "mit",
    "intfloat/multilingual-e5-base": "mit",
    "intfloat/multilingual-e5-large": "mit",
}
OBJECTIVES = {
    "multi_positive": "multi-way contrastive (every language of a row is an anchor, the row's other translations "
                      "its positives; Fazili & Goswami 2026)",
    "pairwise": "symmetric InfoNCE averaged over the language pairs of each row",
    "en_x": "English-centric bilingual baseline (pivot-X pairs only)",
}


def _is_local(name: str | None) -> bool:
    return bool(name) and (Path(str(name)).exists() or str(name).startswith((".", "/", "~")))


def base_model(run: dict[str, Any]) -> str | None:
    """The Hub id of the model training started from: the recorded origin of a local folder, else the name."""
    source = run.get("source") or {}
    if source.get("source"):
        return str(source["source"])
    name = run.get("model")
    if not name or name == "tiny" or _is_local(name):
        return None
    return str(name)


def base_license(run: dict[str, Any]) -> tuple[str | None, str]:
    """``(licence id or None, where it came from)`` of the base model, found offline.

    Looks at the card of a local base folder, then the Hub cache, then the
    licences of the shipped recipes' base models.
    """
    from huggingface_hub import ModelCard

    name = run.get("model")
    candidates = []
    if _is_local(name):
        candidates.append(Path(str(name)) / "README.md")
    hub = base_model(run)
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(hub, "README.md")
            if isinstance(cached, str):
                candidates.append(Path(cached))
        except Exception:  # noqa: BLE001  (an unusual cache layout is not worth failing an export over)
            pass
    for path in candidates:
        if path.is_file():
            try:
                found = ModelCard.load(path).data.license
            except Exception:  # noqa: BLE001
                found = None
            if found:
                return str(found), f"the base model's card ({path})"
    if hub in KNOWN_LICENSES:
        return KNOWN_LICENSES[hub], f"the Hub card of {hub}"
    return None, "unknown: not found offline; check the base model's licence before sharing this model"


def _eval_table(metrics: dict[str, float]) -> str:
    if not metrics:
        return "No evaluation was recorded (no `--data.val_shards`, or exported before the first one)."
    rows = ["| metric | value |", "| --- | ---: |"]
    rows += [f"| `{k}` | {v:.4f} |" for k, v in sorted(metrics.items())]
    return "\n".join(rows)


def build_model_card(run: dict[str, Any], *, prompts: dict[str, str] | None = None, embedding_dim: int | None = None):
    """A ``huggingface_hub.ModelCard`` for an export of the run ``run`` (a :func:`describe_run` dict)."""
    from huggingface_hub import ModelCard, ModelCardData

    base = base_model(run)
    license_id, license_from = base_license(run)
    languages = list(run.get("languages") or [])
    objective = run.get("objective")
    data = ModelCardData(
        language=languages or None,
        license=license_id,
        base_model=base,
        library_name="sentence-transformers",
        pipeline_tag="sentence-similarity",
        tags=["sentence-transformers", "sentence-similarity", "multilingual", "multiway-align",
              *([f"objective-{objective}"] if objective else [])],
    )
    prefix = (prompts or {}).get("query") or ""
    usage = (f'model.encode(texts)  # adds the training prefix "{prefix}" (default prompt "query")' if prefix
             else "model.encode(texts)")
    spec = run.get("data")
    policy = f"(pivot {run.get('pivot')}, policy `{run.get('language_policy')}`)"
    body = f"""
# {Path(str(run.get("export_name") or "aligned encoder")).name}

A multilingual sentence encoder fine-tuned for language-agnostic embeddings with
multiway-align (`align fit`).

| | |
| --- | --- |
| base model | {f"`{base}`" if base else f"`{run.get('model')}`"} |
| licence of the base model | {license_id or "unknown"} ({license_from}) |
| objective | `{objective}`: {OBJECTIVES.get(str(objective), "")} |
| languages | {", ".join(languages) if languages else "not recorded"} {policy} |
| training data | `{spec}` |
| data manifest sha256 | `{run.get("data_manifest_sha256") or "not recorded (shards not given through a manifest)"}` |
| optimiser steps | {run.get("global_step")} |
| tokenizer | `{run.get("tokenizer")}` |
| text prefix | `{prefix!r}` |
| embedding dimension | {embedding_dim} |

## Usage

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("PATH")
embeddings = {usage}
```

`encode_query` and `encode_document` use the same prefix (training used one prefix for every language).
The folder also loads with `transformers.AutoModel` / `AutoTokenizer` (then pool and normalise as
`modules.json` says).

## Last evaluation (held-out rows, during training)

{_eval_table(dict(run.get("last_eval") or {}))}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
