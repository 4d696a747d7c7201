"""Filters for synthetic translations, each optional, and the report that counts what they drop by reason.

Every filter looks at one direction's pairs ``(source text, output)`` and
returns, per pair, a drop reason or None:

==================  ==========================================================  ===========================
reason              what it drops                                               flag
==================  ==========================================================  ===========================
``empty_output``    an output that is empty or whitespace                       on unless ``--filters.drop_bad false``
``copied_source``   an output equal to its source (whitespace and NFC aside)    on unless ``--filters.drop_bad false``
``length_ratio``    longer / shorter (in characters) above the bound            ``--filters.max_length_ratio R``
``wrong_language``  an output the language identifier (py3langid, model in      ``--filters.check_language``
                    its wheel) gives to another language
``roundtrip_chrf``  chrF (sacrebleu) of the output translated back, against      ``--filters.min_roundtrip_chrf X``
                    the source, under the bound
``similarity``      cosine of source and output embeddings under the bound      ``--filters.min_similarity C``
``margin``          LASER ratio margin of the pair (within the part) under it   ``--filters.min_margin M``
==================  ==========================================================  ===========================

Filters run cheapest first, and a pair dropped by one is not scored by the
next (a round trip costs a second generation; only survivors pay it). A row
that loses every synthetic text and has fewer than two languages left is
dropped whole (``too_few_languages``). The report mirrors the shard build's
cleaning report: counts by reason per language, a few examples per reason
naming the row, a table for the terminal and a JSON for the manifest.
"""

from __future__ import annotations

import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache

REASONS = {
    "empty_source": "an input row without text in the source language (nothing to translate)",
    "empty_output": "the model produced an empty translation",
    "copied_source": "the translation is the source text, copied",
    "length_ratio": "longer / shorter text (characters) above --filters.max_length_ratio",
    "wrong_language": "the language identifier gives the translation to another language",
    "roundtrip_chrf": "chrF of the back-translation against the source under --filters.min_roundtrip_chrf",
    "similarity": "embedding cosine of source and translation under --filters.min_similarity",
    "margin": "LASER ratio margin of source and translation under --filters.min_margin",
    "too_few_languages": "a row left with fewer than two languages",
}


@dataclass
class FilterConfig:
    """Which filters run (``align translate run`` flags); all but empty/copied output are off by default."""

    drop_bad: bool = True
    """Drop empty outputs and outputs that copy the source (``--filters.drop_bad false`` keeps them)."""
    max_length_ratio: float | None = None
    """Drop pairs whose longer text has more than this many times the characters of the shorter (e.g. 3)."""
    check_language: bool = False
    """Drop outputs that py3langid (offline, model in its wheel) assigns to another language than the target;
    targets it does not know are passed and counted."""
    min_roundtrip_chrf: float | None = None
    """Translate each output back with the same model and drop pairs whose chrF against the source
    (sacrebleu, 0-100) is under this; costs a second generation."""
    similarity_model: str | None = None
    """Encoder for the embedding filters (any spec align eval loads: folder, checkpoint, hub name)."""
    min_similarity: float | None = None
    """Drop pairs whose embedding cosine (--filters.similarity_model) is under this."""
    min_margin: float | None = None
    """Drop pairs whose ratio margin (k=4 neighbours within the part, LASER) is under this; ~1.0-1.06 usual."""

    def __post_init__(self) -> None:
        if self.max_length_ratio is not None and self.max_length_ratio < 1:
            raise ValueError(f"--filters.max_length_ratio must be >= 1, got {self.max_length_ratio}")
        if self.min_roundtrip_chrf is not None and not 0 <= self.min_roundtrip_chrf <= 100:
            raise ValueError(f"--filters.min_roundtrip_chrf must be between 0 and 100, got {self.min_roundtrip_chrf}")
        if (self.min_similarity is not None or self.min_margin is not None) and not self.similarity_model:
            raise ValueError("--filters.min_similarity and --filters.min_margin need --filters.similarity_model SPEC (an encoder)")
        if self.min_similarity is not None and not -1 <= self.min_similarity <= 1:
            raise ValueError(f"--filters.min_similarity is a cosine, between -1 and 1, got {self.min_similarity}")


class FilterReport:
    """Texts in, kept and dropped by reason, per target language; rows in, written and dropped."""

    def __init__(self, max_examples: int = 5) -> None:
        self.max_examples = max_examples
        self.texts_in: Counter = Counter()
        self.kept: Counter = Counter()
        self.dropped: dict[str, Counter] = defaultdict(Counter)
        self.rows: Counter = Counter()
        self.row_drops: Counter = Counter()
        self.passed_unchecked: Counter = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    def drop(self, reason: str, language: str | None, where: str, detail: str = "") -> None:
        if language is None:
            self.row_drops[reason] += 1
        else:
            self.dropped[language][reason] += 1
        if len(self.examples[reason]) < self.max_examples:
            self.examples[reason].append(f"{where} ({language}): {detail}" if language else f"{where}: {detail}")

    def to_dict(self) -> dict:
        reasons = sorted({r for c in self.dropped.values() for r in c} | set(self.row_drops))
        languages = sorted(set(self.texts_in) | set(self.dropped))
        return {
            "rows": {"in": self.rows["in"], "written": self.rows["written"],
                     "dropped": dict(sorted(self.row_drops.items()))},
            "texts": {"in": sum(self.texts_in.values()), "kept": sum(self.kept.values()),
                      "dropped": dict(sorted(sum(self.dropped.values(), Counter()).items()))},
            "languages": {lang: {"in": self.texts_in[lang], "kept": self.kept[lang],
                                 "dropped": dict(sorted(self.dropped[lang].items()))} for lang in languages},
            "passed_unchecked": dict(sorted(self.passed_unchecked.items())),
            "examples": {r: list(self.examples[r]) for r in reasons},
            "reasons": {r: REASONS[r] for r in reasons},
        }

    @classmethod
    def merged(cls, reports: list[dict]) -> "FilterReport":
        """One report from the parts' :meth:`to_dict` (examples in part order, cut at ``max_examples``)."""
        out = cls()
        for d in reports:
            out.rows.update({"in": d["rows"]["in"], "written": d["rows"]["written"]})
            out.row_drops.update(d["rows"]["dropped"])
            for lang, entry in d["languages"].items():
                out.texts_in[lang] += entry["in"]
                out.kept[lang] += entry["kept"]
                out.dropped[lang].update(entry["dropped"])
            out.passed_unchecked.update(d.get("passed_unchecked", {}))
            for reason, examples in d["examples"].items():
                kept = out.examples[reason]
                kept.extend(examples[: max(0, out.max_examples - len(kept))])
        return out

    def format_table(self) -> str:
        return format_filter_report(self.to_dict())


def format_filter_report(report: dict) -> str:
    """The report as a plain-text table, in the layout of the shard build's cleaning report."""
    rows, texts = report["rows"], report["texts"]
    lines = [f"Filters: {rows['in']} rows in, {rows['written']} written, {rows['in'] - rows['written']} dropped; "
             f"{texts['in']} translations, {texts['kept']} kept"]
    languages = report["languages"]
    reasons = sorted(set(texts["dropped"]) | set(rows["dropped"]))
    if reasons:
        header = "".join(f" {lang:>8}" for lang in languages)
        lines.append(f"  {'reason':<18} {'rows':>6}{header}  description")
        for r in reasons:
            per_lang = "".join(f" {languages[lang]['dropped'].get(r, 0):>8}" for lang in languages)
            lines.append(f"  {r:<18} {rows['dropped'].get(r, 0):>6}{per_lang}  {report['reasons'].get(r, '')}")
        for r in reasons:
            for example in report.get("examples", {}).get(r, [])[:2]:
                lines.append(f"    e.g. {r}: {example}")
    for lang, n in report.get("passed_unchecked", {}).items():
        lines.append(f"  {lang}: {n} translation(s) passed unchecked (the language identifier does not know {lang})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the cheap filters


def _norm(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split()).casefold()


def bad_output(source: str, output: str) -> str | None:
    """``empty_output`` or ``copied_source`` or None."""
    if not output.strip():
        return "empty_output"
    if _norm(output) == _norm(source):
        return "copied_source"
    return None


def length_ratio(source: str, output: str) -> float:
    a, b = len(source.strip()), len(output.strip())
    return max(a, b) / max(min(a, b), 1)


@lru_cache(maxsize=1)
def _identifier():
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError as exc:
        raise ValueError(
            "--filters.check_language needs py3langid (offline, its model ships in the wheel): "
            "pip install 'multiway-align[translate]'"
        ) from exc
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify(text: str) -> str:
    """The ISO 639-1 language py3langid gives ``text``."""
    return _identifier().classify(text)[0]


def identifiable(language: str) -> str | None:
    """The identifier's label for a canonical language (``zh-Hans`` -> ``zh``), or None when it lacks it."""
    base = language.split("-")[0]
    return base if base in _identifier().nb_classes else None


def chrf(hypothesis: str, reference: str) -> float:
    """Sentence chrF (sacrebleu, 0-100)."""
    try:
        import sacrebleu
    except ImportError as exc:
        raise ValueError("--filters.min_roundtrip_chrf needs sacrebleu: pip install 'multiway-align[translate]'") from exc
    return float(sacrebleu.sentence_chrf(hypothesis, [reference]).score)


def check_config(config: FilterConfig) -> None:
    """Fail before any compute when a chosen filter's package is missing."""
    if config.check_language:
        _identifier()
    if config.min_roundtrip_chrf is not None:
        chrf("a", "a")


# --------------------------------------------------------------------------- running them on one direction


class FilterRunner:
    """Applies the configured filters to one direction's pairs; loads the encoder once, when first needed."""

    def __init__(self, config: FilterConfig, report: FilterReport, *, device: str = "cpu") -> None:
        self.config = config
        self.report = report
        self.device = device
        self._encoder = None

    def _encode(self, texts: list[str]):
        from alignment.evaluate.encode import EncodeConfig, encode_texts, resolve_prefix
        from alignment.evaluate.encoder import load_encoder

        if self._encoder is None:
            self._encoder = load_encoder(self.config.similarity_model, device=self.device)
        model, tokenizer, info = self._encoder
        return encode_texts(model, tokenizer, texts, EncodeConfig(quiet=True), prefix=resolve_prefix(info, None))

    def apply(self, where: list[str], sources: list[str], outputs: list[str], source: str, target: str,
              translator) -> list[bool]:
        """Which pairs survive; every drop counted in the report under ``target``.

        ``translator`` (a :class:`~alignment.translate.generate.Translator`) is used for the round trip.
        """
        cfg, report = self.config, self.report
        keep = [True] * len(outputs)
        report.texts_in[target] += len(outputs)

        def drop(i: int, reason: str, detail: str) -> None:
            keep[i] = False
            report.drop(reason, target, where[i], detail)

        for i, (src, out) in enumerate(zip(sources, outputs)):
            reason = bad_output(src, out) if cfg.drop_bad else None
            if reason is not None:
                drop(i, reason, f"{out.strip()[:60]!r}")
            elif cfg.max_length_ratio is not None and length_ratio(src, out) > cfg.max_length_ratio:
                drop(i, "length_ratio", f"{len(src.strip())} vs {len(out.strip())} characters")
        if cfg.check_language:
            label = identifiable(target)
            for i in (i for i in range(len(outputs)) if keep[i]):
                if label is None:
                    report.passed_unchecked[target] += 1
                elif (found := identify(outputs[i])) != label:
                    drop(i, "wrong_language", f"identified as {found}: {outputs[i].strip()[:60]!r}")
        if cfg.min_roundtrip_chrf is not None:
            alive = [i for i in range(len(outputs)) if keep[i]]
            back = translator.translate([outputs[i] for i in alive], target, source)
            for i, text in zip(alive, back):
                score = chrf(text, sources[i])
                if score < cfg.min_roundtrip_chrf:
                    drop(i, "roundtrip_chrf", f"chrF {score:.1f}, back: {text[:60]!r}")
        if cfg.min_similarity is not None or cfg.min_margin is not None:
            self._embedding_filters(keep, sources, outputs, drop)
        report.kept[target] += sum(keep)
        return keep

    def _embedding_filters(self, keep: list[bool], sources: list[str], outputs: list[str], drop) -> None:
        from alignment.evaluate.search import score_aligned

        cfg = self.config
        alive = [i for i in range(len(outputs)) if keep[i]]
        if not alive:
            return
        x = self._encode([sources[i] for i in alive])  # (n, D) unit norm
        y = self._encode([outputs[i] for i in alive])  # (n, D)
        cosine = (x * y).sum(dim=1).tolist()
        margins = None
        if cfg.min_margin is not None:
            k = min(4, len(alive))  # the neighbourhood is the part's other pairs: parts should be large
            margins = score_aligned(x, y, k=k, margin="ratio", chunk_size=4096, backend="exact").tolist()
        for j, i in enumerate(alive):
            if cfg.min_similarity is not None and cosine[j] < cfg.min_similarity:
                drop(i, "similarity", f"cosine {cosine[j]:.3f}")
            elif margins is not None and margins[j] < cfg.min_margin:
                drop(i, "margin", f"margin {margins[j]:.3f}")
