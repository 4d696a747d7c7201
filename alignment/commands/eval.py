"""``align eval``: evaluate an encoder on held-out shards, a TSV or a JSONL; optionally run MTEB.

A thin layer: flags -> :class:`EvalRunConfig` (whose field docstrings are the
flags' help) -> :func:`~alignment.evaluate.encoder.load_encoder`,
:func:`~alignment.evaluate.readers.load_eval_data`,
:func:`~alignment.evaluate.encode.encode_eval_data`,
:func:`~alignment.evaluate.encode.evaluate_encoded`,
:func:`~alignment.evaluate.report.write_report` -> a summary table.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from alignment.commands.common import add_config, build, new_parser, parse
from alignment.evaluate.datasets import EvalData, EvalDataError
from alignment.evaluate.encode import (
    EncodeConfig,
    encode_eval_data,
    evaluate_encoded,
    quiet_library_bars,
    resolve_prefix,
)
from alignment.evaluate.encoder import EncoderInfo, ModelLoadError, RouterEncoder, load_encoder
from alignment.evaluate.mteb_bridge import MtebUnavailableError, mteb_problems, run_mteb
from alignment.evaluate.readers import load_eval_data
from alignment.evaluate.report import markdown_table, write_report
from alignment.evaluate.suite import EvalConfig, EvalResults, flat_metrics
from alignment.languages import DEFAULT_PIVOT, LanguageCodeError, normalize_language, parse_languages
from alignment.model import Pooling

EXAMPLES = """\
examples:
  # held-out test split of a shard build, seen/unseen languages split in the tables
  align eval --model runs/demo/export --data data/gettext --split test \\
      --train_languages en,de,fr,es --out eval/demo

  # a labelled multi-way JSONL (classification transfer) and Procrustes on 500 rows
  align eval --model runs/demo/export --data xnli-dev.jsonl --pivot en --procrustes.fit_rows 500

  # an STS TSV (columns: en de score), a plain Hugging Face folder with CLS pooling
  align eval --model ./labse --pooling cls --data sts17-en-de.tsv --out eval/sts

  # recall@1 and @5 only, a longer probe, no hubness; every flag from a YAML file
  align eval --model runs/demo/export --data data/gettext --retrieval.ks [1,5] --probe.max_iter 200 --hubness_k 0
  align eval --config eval.yaml --encode.batch_size 128

  # retrieval also at the first 64 and 128 coordinates (a model fitted with Matryoshka prefixes)
  align eval --model runs/demo/export --data data/gettext --dims 64,128

  # MTEB tasks (needs: pip install 'multiway-align[mteb]' and access to the Hugging Face hub)
  align eval --model runs/demo/export --mteb STS22.v2,Tatoeba --out eval/mteb

  # MTEB offline on local data: bitext mining on a shard build's test split (STS for a scored TSV/JSONL)
  align eval --model runs/demo/export --mteb_local data/gettext --out eval/mteb-local
"""

# Errors a user can fix from the message alone; anything else is a bug and keeps its traceback.
USER_ERRORS = (EvalDataError, ModelLoadError, MtebUnavailableError, NotImplementedError, ValueError, FileNotFoundError)


@dataclass(kw_only=True)
class EvalRunConfig(EvalConfig):
    """What ``align eval`` does: what to evaluate and where, plus every :class:`EvalConfig` setting
    (``--retrieval.*``, ``--probe.*``, ``--procrustes.*``, ``--hubness_k``, ``--diagnostics``)."""

    model: str
    """Encoder: an exported or saved encoder folder, a Hugging Face folder or hub name, a Lightning .ckpt
    or a DeepSpeed checkpoint folder."""
    data: str | None = None
    """Evaluation data: a shard folder / manifest.json (held-out split), a .tsv (header of language codes,
    optional id/score/label columns) or a .jsonl (multi-way rows, optional score/label)."""
    split: str = "test"
    """Manifest split to read when --data is a shard build."""
    languages: str | None = None
    """Comma-separated languages to evaluate (default: all in the data); each must have rows."""
    pivot: str = DEFAULT_PIVOT
    """Pivot language: trains the transfer probe, anchors Procrustes."""
    train_languages: str | None = None
    """Comma-separated languages the model was (or will be) trained on; tables then split seen / unseen / mixed
    pairs. The pivot counts as trained (every objective trains on it). Default: the languages recorded in an
    export or checkpoint of `align fit`; without either, no split (with a warning)."""
    out: str = "eval"
    """Output folder for metrics.json, report.md and figures/."""
    max_rows: int | None = None
    """Evaluate at most this many rows (the first ones; shard builds are shuffled)."""
    mteb: str | None = None
    """Comma-separated MTEB task names to run as well (needs the [mteb] extra and the Hugging Face hub)."""
    mteb_local: str | None = None
    """Evaluation data (any --data format) to run through MTEB as custom tasks, offline: translation rows become
    LocalBitextMining (one subset per --retrieval.pairs pair), scored pairs LocalSTS; --split, --languages and
    --max_rows apply. MTEB's result files go to <out>/mteb/ (needs the [mteb] extra, not the hub)."""
    pooling: Pooling | None = None
    """Override the pooling (default: the encoder meta's, else mean)."""
    device: str = "cpu"
    """Torch device to encode on (cpu, cuda, cuda:1 ...)."""
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    """Batching, truncation, prefix, seed, progress bars."""
    maps: str | None = None
    """Language maps from align fit-map (a maps folder, or an export carrying them): adds retrieval without and
    with the maps on the evaluated rows (fit them on another split)."""
    variants: str | None = None
    """Comma-separated deployment variants to compare side by side (quality, model size, encode speed): fp32,
    int8 (torch dynamic), onnx, onnx-int8, binary and emb-int8 (quantised embeddings); fp32 is always included."""

    def __post_init__(self) -> None:
        super().__post_init__()
        from alignment.deploy.variants import parse_variants

        parse_variants(self.variants)
        if not self.data and not self.mteb and not self.mteb_local:
            raise ValueError("--data is required (or --mteb TASKS / --mteb_local DATA to run MTEB only)")
        if (self.maps or self.variants) and not self.data:
            raise ValueError(f"--{'maps' if self.maps else 'variants'} compares retrieval on --data: give --data too")
        try:
            self.pivot = normalize_language(self.pivot)
        except LanguageCodeError as exc:
            raise ValueError(f"--pivot: {exc}") from None
        parse_languages(self.languages, "--languages")
        parse_languages(self.train_languages, "--train_languages")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"--max_rows must be >= 1, got {self.max_rows}")
        if self.mteb is not None and not self.mteb_tasks:
            raise ValueError(f"--mteb must name at least one task, got {self.mteb!r}")
        if Path(self.out).is_file():
            raise ValueError(f"--out {self.out} is a file; it must be a folder (created if missing)")

    @property
    def mteb_tasks(self) -> list[str]:
        return [t.strip() for t in (self.mteb or "").split(",") if t.strip()]

    def eval_config(self) -> EvalConfig:
        return EvalConfig(retrieval=self.retrieval, probe=self.probe, diagnostics=self.diagnostics,
                          hubness_k=self.hubness_k, procrustes=self.procrustes, dims=self.dims)  # fmt: skip

    def command_line(self) -> str:
        """The run as one explicit ``align eval`` command, every setting spelled out, for the report."""
        return command_line("eval", self)


def _flag_values(prefix: str, value: object) -> list[tuple[str, object]]:
    if hasattr(value, "__dataclass_fields__"):
        return [kv for name in value.__dataclass_fields__ for kv in _flag_values(f"{prefix}.{name}".lstrip("."),
                                                                                   getattr(value, name))]
    return [(prefix, value)]


def command_line(command: str, config: object, positional: Sequence[str] = ()) -> str:
    """``config`` as one explicit ``align COMMAND`` line, every set field a flag, for reports."""
    parts = ["align", command, *positional]
    values = _flag_values("", config)
    first = [kv for kv in values if kv[0] in ("model", "data")]  # what was evaluated leads the line
    for name, value in first + [kv for kv in values if kv not in first]:
        if value is None or name in positional:
            continue
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, (tuple, list)):
            value = "[" + ",".join(map(str, value)) + "]"
        parts += [f"--{name}", str(value)]
    return shlex.join(parts)


def error(command: str, exc: BaseException) -> int:
    """Print ``align COMMAND: error: ...`` to stderr; exit code 1."""
    print(f"align {command}: error: {exc}", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------- the run


def check_data(config: EvalRunConfig, data: EvalData) -> None:
    """Settings that need the data to be checked: the pivot for transfer, rows for Procrustes."""
    if data.labels is not None and config.pivot not in data.languages:
        raise ValueError(
            f"--pivot {config.pivot}: the classification probe trains on the pivot, but {data.spec} has no "
            f"{config.pivot} text (languages: {', '.join(data.languages)})"
        )
    if config.procrustes is None:
        return
    if not data.rows:
        raise ValueError(f"--procrustes.fit_rows needs translation rows; {data.spec} holds scored pairs only")
    with_pivot = sum(config.pivot in row.texts for row in data.rows)
    if config.procrustes.fit_rows >= with_pivot:
        raise ValueError(
            f"--procrustes.fit_rows ({config.procrustes.fit_rows}) must be smaller than the {with_pivot} rows of "
            f"{data.spec} that have the pivot {config.pivot!r}, so that some rows are held out"
        )


def training_languages(config: EvalRunConfig) -> tuple[str, ...] | None:
    """The languages to count as seen: ``--train_languages`` plus the pivot, else what the model records.

    Prints a note or warning on stderr saying where they came from, whenever they are not exactly the recorded
    ones (a guess: the pivot added to a given list, a list that differs from the record, or no record at all).
    """
    from alignment.runs import recorded_training

    found = recorded_training(config.model)
    recorded = tuple(found[0].get("languages") or ()) if found else ()
    given = parse_languages(config.train_languages, "--train_languages")
    if given is not None:
        languages = given
        if config.pivot not in given:
            languages = (*given, config.pivot)
            print(f"align eval: note: counting the pivot {config.pivot} as a training language (every objective "
                  "trains on the pivot); seen/unseen groups use " + ",".join(languages), file=sys.stderr)
        if recorded and set(recorded) != set(languages):
            print(f"align eval: warning: --train_languages {','.join(languages)} differs from the languages "
                  f"recorded in {found[1]} ({','.join(recorded)}); using --train_languages", file=sys.stderr)
        return languages
    if recorded:
        print(f"align eval: training languages from {found[1]}: {','.join(recorded)}", file=sys.stderr)
        return recorded
    print(f"align eval: warning: {config.model} records no training languages (not an export or checkpoint of "
          "align fit): the tables are not split into seen / unseen; pass --train_languages to split them",
          file=sys.stderr)
    return None


def _meta(config: EvalRunConfig, info: EncoderInfo, data: EvalData, prefix: str, speed: str) -> dict:
    enc = config.encode
    return {
        "model": info.describe(),
        "data": data.describe(),
        "encoding": f"batch {enc.batch_size}, max_length {enc.max_length}, prefix {prefix!r}, seed {enc.seed}, "
        f"device {config.device}",
        "speed": speed,
        "command": config.command_line(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class Inputs:
    """What ``align eval`` reads before loading a model or running anything: ``--data`` (checked against the
    settings), the ``--mteb_local`` data, the ``--maps``."""

    data: EvalData | None = None
    mteb_local: EvalData | None = None
    maps: object | None = None


def read_inputs(config: EvalRunConfig) -> Inputs:
    """Read and check every input file (``--data``, ``--mteb_local``, ``--maps``) before any model is loaded or
    anything runs, so a bad file is named (flag, file, line) before minutes of MTEB or encoding.

    Raises:
        EvalDataError, ValueError, FileNotFoundError: naming the flag and the file.
    """
    inputs = Inputs()
    languages = parse_languages(config.languages, "--languages")
    if config.data:
        try:
            inputs.data = load_eval_data(config.data, split=config.split, languages=languages, max_rows=config.max_rows)
        except EvalDataError as exc:
            raise EvalDataError(f"--data: {exc}") from None
        check_data(config, inputs.data)
        if (config.maps or config.variants) and not inputs.data.rows:
            raise ValueError("--maps and --variants need translation rows in --data (retrieval), not scored pairs only")
    if config.mteb_local:
        from alignment.evaluate.mteb_local import check_local

        try:
            inputs.mteb_local = load_eval_data(config.mteb_local, split=config.split, max_rows=config.max_rows,
                                               languages=languages)  # fmt: skip
        except EvalDataError as exc:
            raise EvalDataError(f"--mteb_local: {exc}") from None
        check_local(inputs.mteb_local, pairs=config.retrieval.pairs, pivot=config.pivot)
    if config.maps:
        from alignment.deploy.maps import LanguageMaps

        try:
            inputs.maps = LanguageMaps.load(config.maps)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"--maps {config.maps}: {exc}") from None
    return inputs


@dataclass
class Loaded:
    """The encoder ``--model`` names, loaded once and checked against ``--variants`` and ``--maps``."""

    model: object
    tokenizer: object
    info: EncoderInfo


def load_model(config: EvalRunConfig, inputs: Inputs) -> Loaded:
    """Load ``--model`` for the ``--data`` evaluation and run the checks that need it (a Router export refuses
    ``--variants``; ``--maps`` must be fitted on this model), before MTEB runs."""
    # --maps applies maps itself: a maps export then loads as its base encoder (no maps applied twice)
    model, tokenizer, info = load_encoder(config.model, device=config.device, pooling=config.pooling,
                                          carried_maps=not config.maps)
    if config.variants and isinstance(model, RouterEncoder):
        raise ValueError(f"--variants needs a plain encoder export; --model {config.model} is a sentence-transformers "
                         "Router export (one route per language): evaluate it without --variants")
    if inputs.maps is not None:
        from alignment.deploy.maps import check_same_model, model_fingerprint

        check_same_model(inputs.maps, model_fingerprint(model), f"--model {config.model}")
    return Loaded(model, tokenizer, info)


def evaluate_data(config: EvalRunConfig, mteb_scores: Sequence = (), *, inputs: Inputs | None = None,
                  loaded: Loaded | None = None) -> tuple[EvalResults, Path]:
    """Encode ``--data``, evaluate, write the report (with ``mteb_scores``); returns the results and the report
    folder. ``inputs`` and ``loaded`` (:func:`read_inputs`, :func:`load_model`) are read here when not given."""
    inputs = inputs if inputs is not None else read_inputs(config)
    loaded = loaded if loaded is not None else load_model(config, inputs)
    data, model, tokenizer, info = inputs.data, loaded.model, loaded.tokenizer, loaded.info
    assert data is not None, "evaluate_data needs --data"
    prefix = resolve_prefix(info, config.encode.prefix)
    encoded = encode_eval_data(model, tokenizer, data, config.encode, prefix=prefix, pivot=config.pivot)
    speed = f"{encoded.num_sentences} sentences in {encoded.seconds:.2f} s ({encoded.sentences_per_second:.0f}/s)"
    if encoded.num_invalid:
        per_lang = "; ".join(f"{lang}: {sum(k.values())}" for lang, k in encoded.invalid.items())
        print(
            f"align eval: warning: {encoded.num_invalid} embeddings are NaN/inf or zero-norm ({per_lang}); "
            "they are left out of every metric and listed in report.md",
            file=sys.stderr,
        )
    trained = training_languages(config)
    results, emb = evaluate_encoded(encoded, config.eval_config(), training_languages=trained,
                                    meta=_meta(config, info, data, prefix, speed))  # fmt: skip
    if config.maps or config.variants:
        add_deploy_results(config, results, encoded, model, lambda m: encode_eval_data(
            m, tokenizer, data, config.encode, prefix=prefix, pivot=config.pivot), trained, inputs.maps)  # fmt: skip
    results.mteb = list(mteb_scores)
    paths = write_report(results, config.out, embeddings=emb, title=f"Evaluation of {Path(config.model).name}")
    return results, paths.markdown.parent


def add_deploy_results(config: EvalRunConfig, results: EvalResults, encoded, model, encode, trained,
                       maps=None) -> None:
    """``--maps`` (``maps``: read and checked against the model by :func:`read_inputs` and :func:`load_model`):
    unmapped vs mapped retrieval; ``--variants``: the quality / size / speed table."""
    from alignment.deploy.variants import evaluate_variants, maps_report, parse_variants

    if encoded.embeddings is None:
        raise ValueError("--maps and --variants need translation rows in --data (retrieval), not scored pairs only")
    if maps is not None:
        results.maps = maps_report(encoded.embeddings, maps, config.retrieval, trained)
        results.meta["maps"] = f"{maps.kind} maps from {config.maps} ({maps.calibration.get('rows')} calibration rows)"
    names = parse_variants(config.variants)
    if names:
        rows = evaluate_variants(names, encode, model, encoded, config.retrieval, trained)
        results.variants = [row.as_dict() for row in rows]


def summary_table(results: EvalResults) -> str:
    """The headline metrics (means and single-number diagnostics) as a Markdown table."""
    flat = flat_metrics(results)

    def headline(key: str) -> bool:
        if "/" not in key or key.startswith("sts_spearman/"):
            return True
        if key.startswith(("procrustes/", "maps/", "dim")):  # dim<d>/...: retrieval at a truncated width (--dims)
            return key.endswith("/mean")
        if key.startswith("variant/"):
            return key.endswith(("/retrieval_acc", "/model_mb", "/sentences_per_s"))
        return key.count("/") == 1 and key.endswith("mean")  # overall and seen/mixed/unseen means

    return markdown_table(("metric", "value"), [(k, v) for k, v in flat.items() if headline(k)])


HELP = "evaluate an encoder: bitext retrieval, xSIM, diagnostics, transfer, STS, Procrustes, MTEB"


def parser():
    """``align eval``'s parser: every field of :class:`EvalRunConfig`."""
    p = new_parser(
        "eval",
        "Encode evaluation data (batched, no gradients, deterministic) and write metrics.json, report.md and "
        "figures/ (2-D projection by language, retrieval heatmap, per-language bars).",
        EXAMPLES,
    )
    add_config(p, EvalRunConfig)
    return p


def run_mteb_tasks(config: EvalRunConfig, inputs: Inputs) -> list:
    """``--mteb`` and ``--mteb_local`` (its data read by :func:`read_inputs`) through one :func:`run_mteb` call;
    MTEB's files under ``<out>/mteb``."""
    from alignment.evaluate.mteb_local import local_tasks

    local = [] if inputs.mteb_local is None else local_tasks(inputs.mteb_local, pairs=config.retrieval.pairs,
                                                             pivot=config.pivot)  # fmt: skip
    scores = run_mteb(config.model, config.mteb_tasks, Path(config.out) / "mteb", local=local,
                      batch_size=config.encode.batch_size, device=config.device, pooling=config.pooling)  # fmt: skip
    print(markdown_table(("MTEB task", "subset", "split", "main score", "value"),
                         [(m.task, m.subset, m.split, m.metric, m.score) for m in scores]))  # fmt: skip
    return scores


def mteb_only_report(config: EvalRunConfig, scores: Sequence) -> Path:
    """Without --data: metrics.json and report.md holding the MTEB scores alone."""
    meta = {"model": config.model, "command": config.command_line(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    results = EvalResults(languages=(), pivot=config.pivot, num_rows=0, num_sentences=0, meta=meta, mteb=list(scores))
    return write_report(results, config.out, title=f"MTEB evaluation of {Path(config.model).name}").markdown.parent


def main(argv: Sequence[str]) -> int:
    p = parser()
    config = build(p, parse(p, argv, "eval"), EvalRunConfig, "eval")
    try:
        quiet_library_bars(config.encode)
        inputs = read_inputs(config)  # every input file, before any model is loaded or anything runs
        scores: list = []
        if config.mteb or config.mteb_local:
            problems = mteb_problems(hub=bool(config.mteb))  # fail before anything is loaded or encoded
            if problems:
                raise MtebUnavailableError("cannot run MTEB here:\n  - " + "\n  - ".join(problems))
        loaded = load_model(config, inputs) if config.data else None  # its checks too, before MTEB runs
        if config.mteb or config.mteb_local:
            scores = run_mteb_tasks(config, inputs)
        if config.data:
            results, out = evaluate_data(config, scores, inputs=inputs, loaded=loaded)
            print(summary_table(results))
            print(f"\nwrote {out / 'metrics.json'}, {out / 'report.md'} and {out / 'figures'}/")
        else:
            out = mteb_only_report(config, scores)
            print(f"\nwrote {out / 'metrics.json'}, {out / 'report.md'} and MTEB's result files under {out / 'mteb'}/")
    except USER_ERRORS as exc:
        return error("eval", exc)
    return 0
