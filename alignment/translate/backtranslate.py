"""Back-translation: rows anchored on monolingual text in a language X.

For a language with monolingual text only, ``align translate run --source X
--via en --targets en,de,fr`` translates each X sentence into English first
(X -> en), then that English into the other targets (en -> de, en -> fr). The
row keeps the X sentence as its only *original* text; every other text is
*synthetic*, and its provenance names the model and the language it was
translated from (``"from": "en"`` for the second hop), so a reader of the
shards can tell a direct translation of the original from a translation of a
translation. Rows are keyed (pivot, splits, duplicates) on English as usual
(``--pivot en``), but their id and their one original text are X's.

Filters apply per hop (a dropped X -> en output takes its row's second hop
with it); the round-trip filter of the first hop translates en back into X.
Iterating (the synthetic pairs train a better X -> en model, which
back-translates again) is a loop of this command and training around it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One direction of a run: every row's ``source`` text translated into ``target``."""

    source: str
    target: str

    def __str__(self) -> str:
        return f"{self.source}->{self.target}"


def plan(source: str, targets: list[str], via: str | None = None) -> list[Step]:
    """The directions of a run, in order: ``source -> t`` for each target, or through ``via`` first.

    Raises:
        ValueError: ``via`` is the source, or no target differs from the source (names the flags).
    """
    if via is None:
        steps = [Step(source, t) for t in targets if t != source]
    else:
        if via == source:
            raise ValueError(f"--via {via} is the --source language; back-translation goes through another one")
        steps = [Step(source, via)] + [Step(via, t) for t in targets if t not in (source, via)]
    if not steps:
        raise ValueError(f"--targets {','.join(targets)}: nothing to translate from --source {source}")
    return steps
