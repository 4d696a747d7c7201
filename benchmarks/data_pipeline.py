"""Data pipeline throughput: shards -> rows -> tokenised, collated ``Batch``, against the raw tokenizer.

Measures rows/s, sentences/s and real tokens/s of ``MultiWayStream`` through a
``DataLoader`` with 0, 1 and 2 workers, beside the raw batched throughput of
the same tokenizer on the same texts in the same batches (the limit: what
tokenising alone costs). Target (issue 15): one worker reaches at least 80% of the
raw *unpadded* tokenizer call (lists of ids: the bare tokenisation work); the
padded, tensor-returning call is reported beside it. A third arm reads the same shards
pre-tokenised (``align shards tokenize``: ids from sidecar tars, no tokenizer
call), with the same batches; its target is 3x the 1-worker tokenising pipeline.
With ``--shards`` a manifest build gets the sidecars written into it (as
``align shards tokenize`` would); ``--no-pretokenised`` skips the arm.

    python benchmarks/data_pipeline.py                       # synthetic shards + synthetic tiny tokenizer
    python benchmarks/data_pipeline.py --tokenizer PATH --shards DIR_WITH_MANIFEST

Writes ``benchmarks/results/data_pipeline-<date>-<tokenizer>-<machine>.{md,json}`` with
the machine, versions, the exact command and the date.

Tokenizer threads: ``TOKENIZERS_PARALLELISM`` defaults to ``false`` here (unless
set), so the raw call and each worker use one core: a like-for-like
comparison of one worker against one tokenizer thread.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, also when loaded by path
from _common import (  # noqa: E402
    RESULTS,
    command_line,
    machine_info,
    machine_lines,
    machine_tag,
    markdown_table,
    now,
    result_stem,
    write_results,
)

PACKAGES = ("transformers", "tokenizers", "webdataset")
PRETOKENISED = "pipeline, pre-tokenised shards"


@dataclass
class Measurement:
    name: str
    workers: int | None
    seconds: float
    cpu_seconds: float
    """CPU time of this process and of the workers it reaped: robust to other jobs on the machine."""
    rows: int
    sentences: int
    real_tokens: int
    padded_tokens: int
    first_batch_s: float | None = None
    steady_seconds: float | None = None
    """From the first batch's arrival to the last's: the rate once the worker runs (start-up excluded)."""
    steady_tokens: int | None = None
    """Real tokens of the batches after the first."""

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds

    @property
    def sentences_per_s(self) -> float:
        return self.sentences / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.real_tokens / self.cpu_seconds

    @property
    def steady_tokens_per_s(self) -> float:
        """Tokens/s after the first batch (fork, worker start-up and the shuffle buffer's fill excluded); the
        whole rate for measurements without start-up (the raw tokenizer)."""
        if self.steady_seconds is None or self.steady_tokens is None or self.steady_seconds <= 0:
            return self.tokens_per_s
        return self.steady_tokens / self.steady_seconds

    @property
    def padding(self) -> float:
        total = self.real_tokens + self.padded_tokens
        return self.padded_tokens / total if total else 0.0


class Clock:
    """Wall time and CPU time (this process plus reaped children, i.e. finished DataLoader workers)."""

    def __enter__(self) -> "Clock":
        self._wall, self._cpu = time.perf_counter(), self._cpu_now()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._wall
        self.cpu_seconds = self._cpu_now() - self._cpu

    @staticmethod
    def _cpu_now() -> float:
        me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", help="tokenizer folder or name (default: the synthetic tiny tokenizer)")
    parser.add_argument("--shards", help="shard spec: manifest folder, glob, ... (default: write synthetic shards)")
    parser.add_argument("--split", default="train", help="manifest split to read (default: train)")
    parser.add_argument("--languages", nargs="*", help="language vocabulary (default: the manifest's)")
    parser.add_argument("--rows", type=int, default=10000, help="synthetic rows to build (default: 10000)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per batch (default: 64)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--policy", default="all", choices=["all", "k", "pivot_pair"])
    parser.add_argument("--bucketing", action="store_true", help="also measure length bucketing")
    parser.add_argument("--no-pretokenised", dest="pretokenised", action="store_false",
                        help="skip the pre-tokenised arm (it writes token sidecars into a --shards manifest build)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--context", default="fork", choices=["fork", "spawn"])
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- inputs


def load_tokenizer(path: str | None):
    if path is None:
        from alignment.synthetic import tiny_tokenizer

        return tiny_tokenizer(), "tiny-synthetic"
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path), Path(path).name or path


def synthetic_shards(directory: Path, rows: int) -> Path:
    """Build ``rows`` synthetic 8-language rows (20% of non-pivot texts missing) with the real shard builder.

    ``align shards``' writer, so the tar layout (plain ustar members) and the
    manifest (row counts, languages) are what training reads; 2500 rows a shard,
    everything in the train split.
    """
    from alignment.data.build import build_shards
    from alignment.data.shards_write import ShardBuildConfig
    from alignment.synthetic import SYNTHETIC_LANGUAGES, synthetic_rows

    data = synthetic_rows(rows, SYNTHETIC_LANGUAGES, seed=0, missing_prob=0.2)
    out = directory / "synthetic"
    build_shards(data, ShardBuildConfig(out=out, rows_per_shard=2500, split="1,0,0"))
    return out


def resolve_inputs(args: argparse.Namespace, tmp: Path):
    """Shards (with row counts when a manifest has them) and the language vocabulary."""
    from alignment.data.datamodule import resolve_shard_spec
    from alignment.data.manifest import manifest_languages

    spec = args.shards if args.shards is not None else str(synthetic_shards(tmp, args.rows))
    languages = args.languages or manifest_languages(spec)
    if not languages:
        sys.exit("--languages is required when --shards has no manifest")
    return resolve_shard_spec(spec, args.split), languages, spec


def pretokenised_shards(spec: str, shards, tokenizer, config, split: str):
    """The shards with the sidecars of ``align shards tokenize`` (written now unless already there), or None
    when ``spec`` is not a manifest build."""
    from alignment.data.manifest import MANIFEST_NAME
    from alignment.data.tokens import sidecar_paths, tokenize_build

    if not (Path(spec) / MANIFEST_NAME).is_file() and not spec.endswith(".json"):
        return None
    key, _, _ = tokenize_build(spec, tokenizer, max_length=config.max_length, text_prefix=config.text_prefix,
                               log=lambda line: None)
    paths = sidecar_paths(spec, split, key)
    return [replace(ref, tokens=paths[ref.url]) for ref in shards]


def batch_texts(shards, config, languages) -> tuple[list[list[str]], int]:
    """The same rows' sentences in batches of ``batch_size`` rows, in file order (the raw baseline's input), and the row count."""
    import random

    from alignment.data.collate import select_languages
    from alignment.data.samples import SkipTally, iter_shard_payloads, parse_payload

    tally, rng, vocabulary = SkipTally(), random.Random(0), frozenset(languages)
    texts: list[list[str]] = []
    batch: list[str] = []
    rows_in_batch = rows = 0
    for shard in shards:
        for key, payload in iter_shard_payloads(shard, tally):
            row = parse_payload(key, payload, shard=shard.url, vocabulary=vocabulary, tally=tally)
            chosen = row and select_languages(
                sorted(row.texts), policy=config.language_policy, k=config.k, pivot=config.pivot, rng=rng
            )
            if not chosen:
                continue
            batch.extend(config.text_prefix + row.texts[lang] for lang in chosen)
            rows_in_batch += 1
            rows += 1
            if rows_in_batch == config.batch_size:
                texts.append(batch)
                batch, rows_in_batch = [], 0
    return texts + ([batch] if batch else []), rows


# --------------------------------------------------------------------------- measurements


def measure_raw(tokenizer, batches: list[list[str]], rows: int, max_length: int, padded: bool) -> Measurement:
    """The tokenizer alone: one batched call per batch of sentences."""
    real = padded_tokens = 0
    with Clock() as clock:
        for texts in batches:
            if padded:
                encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                mask = encoded["attention_mask"]
                real += int(mask.sum())
                padded_tokens += int(mask.numel()) - int(mask.sum())
            else:
                encoded = tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False)
                real += sum(map(len, encoded["input_ids"]))
    name = "raw tokenizer (padded, pt)" if padded else "raw tokenizer (unpadded lists)"
    sentences = sum(map(len, batches))
    return Measurement(name, None, clock.seconds, clock.cpu_seconds, rows, sentences, real, padded_tokens)


def measure_pipeline(shards, tokenizer, config, languages, workers: int, context: str, name: str) -> Measurement:
    """One epoch through ``DataLoader(MultiWayStream)``, worker start-up included."""
    from torch.utils.data import DataLoader

    from alignment.data.stream import MultiWayStream

    stream = MultiWayStream(shards, tokenizer, config, languages=languages, num_workers=workers, rank=0, world_size=1)
    kwargs = {"multiprocessing_context": context} if workers else {}
    loader = DataLoader(stream, batch_size=None, num_workers=workers, **kwargs)
    rows = sentences = real = total = 0
    first = last = None
    first_tokens = 0
    with Clock() as clock:
        start = time.perf_counter()
        for batch in loader:
            last = time.perf_counter() - start
            if first is None:
                first, first_tokens = last, batch.real_tokens
            rows += batch.num_rows
            sentences += batch.num_sentences
            real += batch.real_tokens
            total += batch.input_ids.numel()
    steady = None if first is None else last - first
    return Measurement(name, workers, clock.seconds, clock.cpu_seconds, rows, sentences, real, total - real, first,
                       steady, real - first_tokens)


def median_of(runs: list[Measurement]) -> Measurement:
    return sorted(runs, key=lambda m: m.seconds)[len(runs) // 2]


def run(args: argparse.Namespace) -> dict:
    """Every measurement ``--repeats`` times, interleaved so that load from other jobs hits them alike."""
    from alignment.data.config import StreamConfig

    tokenizer, tokenizer_name = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        shards, languages, spec = resolve_inputs(args, Path(tmp))
        config = StreamConfig(
            batch_size=args.batch_size, languages=languages, max_length=args.max_length, language_policy=args.policy
        )
        pretokenised = pretokenised_shards(spec, shards, tokenizer, config, args.split) if args.pretokenised else None
        batches, rows = batch_texts(shards, config, languages)
        tasks = [lambda padded=padded: measure_raw(tokenizer, batches, rows, args.max_length, padded) for padded in (True, False)]
        variants = [("pipeline", config, shards)]
        variants += [("pipeline + bucketing", replace(config, bucketing=True), shards)] if args.bucketing else []
        variants += [(PRETOKENISED, config, pretokenised)] if pretokenised is not None else []
        for name, cfg, arm in variants:
            for workers in args.workers:
                tasks.append(
                    lambda name=name, cfg=cfg, arm=arm, workers=workers: measure_pipeline(
                        arm, tokenizer, cfg, languages, workers, args.context, name
                    )
                )
        # As every DataLoader worker does (MultiWayStream.__iter__): without it the garbage collector's full
        # passes over torch's and transformers' objects slow the raw tokenizer calls too, flattering the pipeline.
        gc.freeze()
        load_before = tuple(round(x, 2) for x in os.getloadavg())
        runs: list[list[Measurement]] = [[] for _ in tasks]
        for _ in range(args.repeats):
            for i, task in enumerate(tasks):
                runs[i].append(task())
        load_after = tuple(round(x, 2) for x in os.getloadavg())
    return {
        "tokenizer": tokenizer_name,
        "rows": rows,
        "shards": len(shards),
        "languages": languages,
        "load_average": {"before": load_before, "after": load_after},
        "results": [median_of(r) for r in runs],
    }


# --------------------------------------------------------------------------- reporting


def table(report: dict) -> str:
    raw, raw_unpadded = report["results"][:2]
    header = ["measurement", "workers", "rows/s", "sentences/s", "real tokens/s", "padding", "vs raw padded",
              "vs raw unpadded", "steady tokens/s (after the 1st batch)", "steady vs raw unpadded", "1st batch (s)",
              "tokens per CPU-s", "vs raw padded (CPU)"]
    rows = [
        [m.name, "-" if m.workers is None else m.workers, f"{m.rows_per_s:,.0f}", f"{m.sentences_per_s:,.0f}",
         f"{m.tokens_per_s:,.0f}", f"{m.padding:.1%}", f"{m.tokens_per_s / raw.tokens_per_s:.0%}",
         f"{m.tokens_per_s / raw_unpadded.tokens_per_s:.0%}", f"{m.steady_tokens_per_s:,.0f}",
         f"{m.steady_tokens_per_s / raw_unpadded.tokens_per_s:.0%}",
         "-" if m.first_batch_s is None else f"{m.first_batch_s:.3f}", f"{m.tokens_per_cpu_s:,.0f}",
         f"{m.tokens_per_cpu_s / raw.tokens_per_cpu_s:.0%}"]
        for m in report["results"]
    ]
    return markdown_table(header, rows)


def verdict(report: dict) -> str:
    raw, raw_unpadded = report["results"][:2]
    one = [m for m in report["results"] if m.workers == 1 and m.name == "pipeline"]
    if not one:
        return "target not measured (no 1-worker run)"
    wall = one[0].tokens_per_s / raw.tokens_per_s
    strict = one[0].tokens_per_s / raw_unpadded.tokens_per_s
    cpu = one[0].tokens_per_cpu_s / raw.tokens_per_cpu_s
    steady = one[0].steady_tokens_per_s / raw_unpadded.tokens_per_s
    ok = lambda value, target: "met" if value >= target else "NOT met"  # noqa: E731
    line = (
        f"1 worker, whole epoch (worker start-up included): {strict:.0%} of the raw unpadded tokenizer call in "
        f"wall-clock throughput ({wall:.0%} of the padded call; {cpu:.0%} of the padded call per CPU-second), "
        f"target >= 80% {ok(strict, 0.8)}; after the first batch: {steady:.0%}, {ok(steady, 0.8)}"
    )
    pre = [m for m in report["results"] if m.workers == 1 and m.name == PRETOKENISED]
    if pre:
        ratio, ratio_cpu = pre[0].tokens_per_s / one[0].tokens_per_s, pre[0].tokens_per_cpu_s / one[0].tokens_per_cpu_s
        ratio_steady = pre[0].steady_tokens_per_s / one[0].steady_tokens_per_s
        line += (
            f". Pre-tokenised shards, 1 worker, whole epoch: {ratio:.2f}x the tokenising pipeline ({ratio_cpu:.2f}x "
            f"per CPU-second; {pre[0].tokens_per_s / raw_unpadded.tokens_per_s:.2f}x the raw unpadded call), "
            f"target >= 3x {ok(ratio, 3)}; after the first batch: {ratio_steady:.2f}x, {ok(ratio_steady, 3)}"
        )
    return line


def write_report(report: dict, args: argparse.Namespace) -> tuple[Path, Path]:
    meta = {
        "date": now(),
        "command": command_line("data_pipeline.py", None),
        "machine": machine_info(*PACKAGES),
        "env": {"TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM")},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    results = [{**asdict(m), "rows_per_s": m.rows_per_s, "tokens_per_s": m.tokens_per_s} for m in report["results"]]
    data = {**meta, **{k: v for k, v in report.items() if k != "results"}, "results": results, "verdict": verdict(report)}
    markdown = "\n".join(
        [
            f"# Data pipeline throughput, {meta['date'][:10]}",
            "",
            *machine_lines(meta["machine"], PACKAGES),
            f"- tokenizer: {report['tokenizer']}; TOKENIZERS_PARALLELISM={meta['env']['TOKENIZERS_PARALLELISM']}",
            f"- data: {report['rows']} rows in {report['shards']} shards, {len(report['languages'])} languages, "
            f"batch {args.batch_size} rows, max_length {args.max_length}, policy {args.policy}, "
            f"{args.context} workers, median of {args.repeats} interleaved runs, worker start-up included; "
            "CPU-s = CPU time of the benchmark process and its reaped workers",
            f"- load average (1, 5, 15 min) before / after: {report['load_average']['before']} / "
            f"{report['load_average']['after']} (other jobs on the machine lower and scatter the numbers)",
            f"- command: `{meta['command']}`",
            "",
            table(report),
            "",
            f"**{verdict(report)}**",
            "",
        ]
    )
    stem = result_stem("data_pipeline", meta["date"], report["tokenizer"], machine_tag(meta["machine"]))
    return write_results(args.out, stem, markdown, data)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    report = run(args)
    print(table(report))
    print(verdict(report))
    for path in write_report(report, args):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
