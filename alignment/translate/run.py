"""One rank of ``align translate run``: read the input, translate this rank's unfinished parts, publish them.

The model is loaded once per process, and only when the rank has a part left to do.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from alignment.languages import DEFAULT_PIVOT, LanguageCodeError, normalize_language
from alignment.translate.backtranslate import Step, plan
from alignment.translate.codes import FAMILIES, Family, parse_language_list
from alignment.translate.filters import FilterConfig, FilterReport, FilterRunner, check_config
from alignment.translate.generate import GenerateConfig, Translator
from alignment.translate.io import (
    INPUT_FORMATS,
    ORIGINAL,
    InputFormat,
    SourceRow,
    input_fingerprint,
    output_row,
    read_sources,
)
from alignment.translate.parts import RunFolder, merge


@dataclass
class TranslateConfig:
    """What ``align translate run`` does (one field per flag)."""

    inputs: list[str]
    """Input files: plain text (one sentence per line), JSONL rows, or shards (a folder with manifest.json)."""
    out: str
    """Run folder: parts, their manifest entries, and (after the merge) corpus.jsonl and manifest.json."""
    model: str
    """Any Hugging Face seq2seq model (AutoModelForSeq2SeqLM): folder or hub name (NLLB-200, M2M100, mBART-50,
    MarianMT)."""
    targets: list[str]
    """Target languages, comma-separated BCP-47 or the model's own codes (de,fr,zh or deu_Latn,...)."""
    source: str = DEFAULT_PIVOT
    """Language of the input text (of the pivot column for JSONL and shards)."""
    via: str | None = None
    """Back-translation: translate the source into this language first, then that into the other targets
    (e.g. --source sw --via en --targets en,de); rows stay anchored on the original source text."""
    pivot: str | None = None
    """The rows' pivot (what align shards build keys splits on); default: --via when set, else --source."""
    input_format: InputFormat = "auto"
    """auto (by name: folder/manifest/.tar = shards, .jsonl = jsonl, else lines), lines, jsonl, shards."""
    family: Family | None = None
    """Language-code family (nllb, m2m100, mbart50, marian); default: detected from the model."""
    part_rows: int = 2048
    """Input rows per part: the unit of work, publish and resume (the split ignores the number of ranks)."""
    rank: int | None = None
    """This process's rank; default: from torchrun (RANK) or SLURM (array task / SLURM_PROCID)."""
    world_size: int | None = None
    """Number of ranks; default: from torchrun (WORLD_SIZE) or SLURM (array task count x SLURM_NTASKS)."""
    merge: bool = True
    """Merge into OUT/corpus.jsonl when this rank finds every part finished (--merge false leaves it to
    `align translate merge`)."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """Decoding: beams, lengths, batching, dtype, device."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """Which outputs are dropped: empty or copied, length ratio, language id, round-trip chrF, similarity."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("align translate run needs at least one INPUT")
        for path in self.inputs:  # before the model loads and before the run folder records anything
            if not Path(path).exists():
                raise ValueError(f"INPUT {path}: no such file or folder")
        self.targets = parse_language_list(self.targets, "--targets")
        self.source = _language(self.source, "--source")
        self.via = _language(self.via, "--via") if self.via else None
        self.pivot = _language(self.pivot, "--pivot") if self.pivot else (self.via or self.source)
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"--input_format must be one of {', '.join(INPUT_FORMATS)}, got {self.input_format!r}")
        if self.family is not None and self.family not in FAMILIES:
            raise ValueError(f"--family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.part_rows < 1:
            raise ValueError(f"--part_rows must be >= 1, got {self.part_rows}")
        if (self.rank is None) != (self.world_size is None):
            raise ValueError("--rank and --world_size go together (or neither: taken from torchrun / SLURM)")
        if self.world_size is not None and not 0 <= self.rank < self.world_size:  # type: ignore[operator]
            raise ValueError(f"--rank must be in [0, --world_size), got {self.rank} of {self.world_size}")
        self.steps: list[Step] = plan(self.source, self.targets, self.via)
        if self.pivot not in {self.source, self.via, *self.targets}:
            raise ValueError(f"--pivot {self.pivot} is not the --source, the --via or one of the --targets")

    def settings(self) -> dict:
        """What every rank and every resume must share: anything that changes the rows written."""
        gen = self.generate
        return {"inputs": list(self.inputs), "model": self.model, "family": self.family, "source": self.source,
                "targets": list(self.targets), "via": self.via, "pivot": self.pivot,
                "input_format": self.input_format, "part_rows": self.part_rows, "beams": gen.beams,
                "max_length": gen.max_length, "dtype": gen.dtype, "filters": asdict(self.filters)}


def _language(code: str, flag: str) -> str:
    try:
        return parse_language_list([code], flag)[0]
    except ValueError:
        try:
            return normalize_language(code)
        except LanguageCodeError as exc:
            raise ValueError(f"{flag}: {exc}") from exc


def _parts(rows: Iterator[SourceRow], part_rows: int) -> Iterator[tuple[int, list[SourceRow]]]:
    """Consecutive parts of ``part_rows`` rows (the last may be shorter)."""
    for part in itertools.count():
        chunk = list(itertools.islice(rows, part_rows))
        if not chunk:
            return
        yield part, chunk


def input_sha(rows: list[SourceRow]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps([row.id, row.text, row.texts], ensure_ascii=False, sort_keys=True).encode("utf-8"))
    return h.hexdigest()


def translate_part(rows: list[SourceRow], config: TranslateConfig, translator: Translator,
                   filters: FilterRunner) -> tuple[bytes, dict]:
    """The part's output lines and its counts: every step of the plan, filtered, assembled into rows."""
    report = filters.report
    report.rows["in"] += len(rows)
    texts: list[dict[str, str]] = []
    provenance: list[dict[str, dict]] = []
    for row in rows:
        mine = dict(row.texts)
        prov = {lang: row.provenance.get(lang, ORIGINAL) for lang in mine}
        if row.text is not None and row.text.strip():
            mine[config.source] = row.text.strip()
            prov.setdefault(config.source, ORIGINAL)
        texts.append(mine)
        provenance.append(prov)
    model = translator.describe()
    for step in config.steps:
        todo = [i for i, t in enumerate(texts) if t.get(step.source, "").strip() and step.target not in t]
        sources = [texts[i][step.source] for i in todo]
        outputs = translator.translate(sources, step.source, step.target)
        keep = filters.apply([rows[i].where for i in todo], sources, outputs, step.source, step.target, translator)
        for i, out, ok in zip(todo, outputs, keep):
            if ok:
                texts[i][step.target] = out
                provenance[i][step.target] = {"origin": "synthetic", "model": model["model"], "from": step.source}
    lines, languages, origins = [], Counter(), Counter()
    for row, row_texts, prov in zip(rows, texts, provenance):
        if not (row.text or "").strip() and config.source not in row.texts:
            report.drop("empty_source", None, row.where, "no text to translate")
            continue
        if len(row_texts) < 2:
            report.drop("too_few_languages", None, row.where, f"only {', '.join(row_texts) or 'nothing'} left")
            continue
        lines.append(output_row(row, config.pivot, row_texts, prov))  # type: ignore[arg-type]
        languages.update(row_texts.keys())
        for lang, p in prov.items():
            origins[(lang, p.get("origin", "original"), p.get("model", ""))] += 1
    report.rows["written"] += len(lines)
    summary: dict[str, dict] = {}
    for (lang, origin, name), n in sorted(origins.items()):
        entry = summary.setdefault(lang, {})
        if origin == "synthetic":
            entry.setdefault("synthetic", {})[name] = n
        else:
            entry[origin] = entry.get(origin, 0) + n
    counts = {"rows_out": len(lines), "languages": dict(sorted(languages.items())), "provenance": summary}
    return "".join(lines).encode("utf-8"), counts


def _load(config: TranslateConfig) -> Translator:
    """The model, once per process; every language of the plan checked against its codes before any compute."""
    from alignment.distributed import launcher_local_rank

    translator = Translator(config.model, config.generate, family=config.family, local_rank=launcher_local_rank())
    for step in config.steps:
        translator.languages.code(step.source, flag="--via" if step.source == config.via else "--source",
                                  role="source")
        translator.languages.code(step.target, flag="--via" if step.target == config.via else "--targets")
        if config.filters.min_roundtrip_chrf is not None:  # the way back needs the reverse direction too
            translator.languages.code(step.target, flag="--filters.min_roundtrip_chrf: translating back from", role="source")
            translator.languages.code(step.source, flag="--filters.min_roundtrip_chrf: translating back into")
    return translator


def run_rank(config: TranslateConfig, rank: int, world: int, *, log=print, command: str | None = None) -> dict:
    """Translate this rank's unfinished parts; merge when every part is finished (and ``config.merge``).

    Returns a summary: parts done now, parts skipped as finished, the merge's manifest (or None).
    """
    folder = RunFolder(config.out)
    check_config(config.filters)
    translator: Translator | None = None
    if not folder.claimed():  # a new run: check the model knows every language before recording it
        translator = _load(config)
    folder.claim(config.settings())
    done, skipped, total_rows, parts = [], [], 0, 0
    for part, rows in _parts(read_sources(config.inputs, config.source, config.input_format), config.part_rows):
        total_rows += len(rows)
        parts = part + 1
        if part % world != rank:
            continue
        sha = input_sha(rows)
        if folder.finished(part, sha):
            skipped.append(part)
            continue
        folder.clear_stale(part)
        if translator is None:  # loaded once, and only by a rank with work left
            translator = _load(config)
        thr = translator.throughput
        before = thr.sentences, thr.seconds, thr.generated_tokens
        start = time.perf_counter()
        report = FilterReport()
        runner = FilterRunner(config.filters, report, device=str(translator.device))
        data, counts = translate_part(rows, config, translator, runner)
        sentences, seconds = thr.sentences - before[0], thr.seconds - before[1]
        entry = folder.publish_part(part, data, {
            "first_row": part * config.part_rows, "rows_in": len(rows), "input_sha256": sha, **counts,
            "report": report.to_dict(), "rank": rank, "world_size": world,
            "throughput": {"sentences": sentences, "seconds": round(seconds, 3),
                           "generated_tokens": thr.generated_tokens - before[2],
                           "wall_seconds": round(time.perf_counter() - start, 3)},
        })
        done.append(part)
        log(f"[rank {rank}/{world}] part {part}: {len(rows)} rows in, {entry['rows_out']} written, "
            f"{sentences} sentences in {seconds:.1f} s ({sentences / seconds if seconds else 0:.1f} sentences/s)")
    folder.record_inputs(total_rows, parts, input_fingerprint(config.inputs))
    manifest = None
    missing = folder.missing_parts()
    if config.merge and missing == []:
        manifest = merge(config.out, command=command)
    elif missing:
        log(f"[rank {rank}/{world}] {len(missing)} part(s) still unfinished by other ranks; "
            f"merge with `align translate merge {config.out}` when they are done", file=sys.stderr)
    return {"done": done, "skipped": skipped, "rows": total_rows, "parts": parts, "manifest": manifest,
            "throughput": translator.throughput.to_dict() if translator else None,
            "model": translator.describe() if translator else None}
