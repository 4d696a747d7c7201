"""Test helpers for ``align translate``: the tiny translators (:mod:`alignment.translate.tiny`) and a batch recorder."""

from __future__ import annotations

import json

from lightning.pytorch import Callback

from alignment.translate.tiny import (  # noqa: F401
    BUILDERS,
    FAMILIES,
    LANGUAGES,
    build_m2m100,
    build_marian,
    build_mbart50,
    build_nllb,
    sentences,
)


class RecordBatches(Callback):
    """Test-only Lightning callback: append each training batch's rows (dataset id -> languages) to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rows: dict[str, list[str]] = {}
        for row, lang in zip(batch.row_ids.tolist(), batch.lang_ids.tolist()):
            rows.setdefault(batch.row_keys[row], []).append(batch.languages[lang])
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({k: sorted(v) for k, v in rows.items()}) + "\n")
