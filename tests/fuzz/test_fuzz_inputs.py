"""Fuzz tier: seeded malformed inputs through ``align shards build|verify``, a tiny ``align fit`` and ``align eval``.

Every case must end in exit status 0, or in an error a person can read (one
``align <command>: error:`` line naming the input; ``shards verify`` lists one
``FAIL`` line per problem), never a traceback, a hang (each case has a wall-clock
alarm), or a file written outside the command's output folder (the working
directory, a sandbox, is snapshotted before and after each case).

The generator is seeded (``FUZZ_SEED``, default 0; ``FUZZ_CASES`` scales the
random-bytes cases), so a failure reproduces exactly. Cost: about a minute on the
2-core CPU machine.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import random
import shutil
import signal
import tarfile
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from alignment.cli import main
from tests import _training as T

SEED = int(os.environ.get("FUZZ_SEED", "0"))
CASES = int(os.environ.get("FUZZ_CASES", "6"))
CASE_SECONDS = 90

ODD_TEXTS = [
    "\u202eevil\u202c", "a\u200b\u200bb", "e\u0301\u0301\u0301", "\ufeffbom inside", "nul\x00byte", "\uffff\ufffe",
    "\U0001f600" * 50, "\\ud800 lone", "tab\tand\nnewline", "\x1b[31mred", "Ω" * 3000, "",
]
JSON_VALUES = [None, True, 0, -1, 1e308, [], ["a"], {}, {"en": "x"}, "x", "\ud800"]


class CaseTimeout(Exception):
    pass


@contextmanager
def _alarm(seconds: int):
    def fire(signum, frame):
        raise CaseTimeout(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_align(argv: list[str], sandbox: Path, outputs: list[Path]) -> tuple[int, str]:
    """``align ARGV`` in-process with the sandbox as working directory; returns (exit status, stderr).

    Fails the test on an exception (a traceback), a hang, or a new path in the sandbox outside ``outputs``.
    """
    before = _snapshot(sandbox)
    err, out = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(sandbox)
    try:
        with _alarm(CASE_SECONDS), redirect_stderr(err), redirect_stdout(out):
            rc = main(argv)
    except SystemExit as exc:  # argparse's usage errors are fine: exit 2 with a message
        rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # a traceback for the user
        pytest.fail(f"align {' '.join(argv)} raised {type(exc).__name__}: {exc}\nstderr:\n{err.getvalue()[-3000:]}")
    finally:
        os.chdir(cwd)
    allowed = [str(p.relative_to(sandbox)) for p in outputs if p.is_relative_to(sandbox)]
    new = {p for p in _snapshot(sandbox) - before if not any(p == a or p.startswith(a + "/") for a in allowed)}
    assert not new, f"align {' '.join(argv)} wrote outside its output folder: {sorted(new)[:10]}"
    return rc, err.getvalue()


def _error_lines(stderr: str, command: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"align {command}: error:")]


def assert_readable(rc: int, stderr: str, command: str, names: str | None = None) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    if rc == 0:
        return
    errors = _error_lines(stderr, command)
    assert len(errors) == 1, f"exit {rc} without one 'align {command}: error:' line:\n{stderr[-3000:]}"
    if names is not None:
        assert names in errors[0], f"the error does not name {names!r}: {errors[0]}"


# ---------------------------------------------------------------------------- generated corpora


def _good_rows(rng: random.Random, n: int) -> list[dict]:
    return [{"id": f"r{i}", "en": f"sentence {i} {rng.random():.6f}", "de": f"Satz {i}", "fr": f"phrase {i}"}
            for i in range(n)]


def corpus_cases(rng: random.Random) -> list[tuple[str, str, bytes]]:
    """``(case name, file suffix, bytes)`` of malformed JSONL inputs, each mixed with some good rows."""
    good = "".join(json.dumps(r) + "\n" for r in _good_rows(rng, 30)).encode()
    cases = []
    for i in range(CASES):
        cases.append((f"random-bytes-{i}", ".jsonl", rng.randbytes(rng.randint(1, 20000))))
        cases.append((f"bytes-in-rows-{i}", ".jsonl", good[: rng.randint(0, len(good))] + rng.randbytes(500) + good))
    for name, compress in (("gz", gzip.compress), ("xz", lzma.compress), ("bz2", bz2.compress)):
        packed = compress(good * 20)
        cases.append((f"truncated-{name}", f".jsonl.{name}", packed[: rng.randint(1, len(packed) - 1)]))
        cases.append((f"garbage-{name}", f".jsonl.{name}", rng.randbytes(3000)))
    odd = [{"id": f"o{i}", "en": rng.choice(ODD_TEXTS) + f" {i}", "de": rng.choice(ODD_TEXTS)} for i in range(40)]
    cases.append(("odd-unicode", ".jsonl", "".join(json.dumps(r) + "\n" for r in odd).encode() + good))
    raw_odd = b"".join(b'{"en": "x%d", "de": "\\ud800\\udc00\\udfff %d"}\n' % (i, i) for i in range(10))
    cases.append(("escaped-surrogates", ".jsonl", raw_odd + good))
    wrong = []
    for i in range(60):
        row = {"id": rng.choice(JSON_VALUES + [f"w{i}"]), "en": f"x {i}"}
        row[rng.choice(["de", "texts", "fr", "id", "pivot", "123", "", "../../x", "pipe:touch PWNED"])] = \
            rng.choice(JSON_VALUES)
        wrong.append(json.dumps(row))
    wrong += ["[1, 2, 3]", "null", "42", '"a string"', "{", '{"en": "a"' + ', "de": "b"' * 2 + "}"]
    cases.append(("wrong-json-types", ".jsonl", ("\n".join(wrong) + "\n").encode() + good))
    cases.append(("deep-nesting", ".jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n" + good))
    cases.append(("giant-line", ".jsonl", good + b'{"en": "' + b"x" * (17 << 20) + b'", "de": "y"}\n' + good))
    cases.append(("no-newline-at-end", ".jsonl", good.rstrip(b"\n")))
    cases.append(("empty", ".jsonl", b""))
    return cases


@pytest.mark.parametrize("case", corpus_cases(random.Random(SEED)), ids=lambda c: c[0])
def test_shards_build_on_malformed_corpora(tmp_path, case):
    name, suffix, data = case
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    path = sandbox / f"input{suffix}"
    path.write_bytes(data)
    out = sandbox / "out"
    rc, err = run_align(["shards", "build", "--format", "jsonl", path.name, "--out", "out"], sandbox, [out])
    assert_readable(rc, err, "shards build", names="input")
    if rc == 0:
        rc, err = run_align(["shards", "verify", "out"], sandbox, [])
        assert rc == 0, err
    assert not list(sandbox.glob(".out.*")), "a build folder was left behind"


# ---------------------------------------------------------------------------- hostile shard folders


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A good build plus the tiny tokenizer and a 1-step checkpoint of the tiny model (for eval)."""
    root = tmp_path_factory.mktemp("fuzzbase")
    corpus = T.make_corpus(root, rows=120, rows_per_shard=20)
    trainer = T.trainer(root / "fit", max_steps=1)
    trainer.fit(T.module(corpus), datamodule=T.datamodule(corpus))
    trainer.save_checkpoint(root / "model.ckpt")
    return corpus, root / "model.ckpt"


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _hostile_samples(rng: random.Random) -> list[tuple[str, bytes]]:
    rows = [json.dumps({"id": f"h{i}", "texts": {"en": f"hello {i}", "de": f"hallo {i}"}}).encode() for i in range(8)]
    odd = [json.dumps(v).encode() for v in ({"id": 1, "texts": ["en"]}, {"texts": {"en": 5, "de": None}},
                                             {"id": "x", "texts": {"xx-invalid-$": "a", "en": "b"}}, [1, 2], "str")]
    members = [(f"k{i}.json", r) for i, r in enumerate(rows)]
    members += [(f"odd{i}.json", o) for i, o in enumerate(odd)]
    members += [("../../escape.json", rows[0]), ("bad.json", b"{not json"), ("bin.json", rng.randbytes(64)),
                ("dup.json", rows[1]), ("dup.json", rows[2]), ("noext", rows[3])]
    rng.shuffle(members)
    return members


def shard_folder_cases(rng: random.Random) -> list[tuple[str, callable]]:
    """``(name, mutate(folder))``: each turns a copy of a good build into a hostile one."""

    def manifest_edit(edit):
        def mutate(folder: Path) -> None:
            file = folder / "manifest.json"
            manifest = json.loads(file.read_text())
            edit(manifest, folder)
            file.write_text(json.dumps(manifest))
        return mutate

    def shard_path(value):
        def edit(m, folder):
            for split in ("train", "test"):
                m["splits"][split]["shards"][0]["path"] = value
        return edit

    def first_shards(folder: Path) -> list[Path]:
        m = json.loads((folder / "manifest.json").read_text())
        return [folder / m["splits"][s]["shards"][0]["path"] for s in ("train", "test")]

    def rewrite_shards(make):
        def mutate(folder: Path) -> None:
            for shard in first_shards(folder):
                shard.write_bytes(make(shard.read_bytes()))
        return mutate

    def symlink_out(folder: Path) -> None:
        for shard in first_shards(folder):
            outside = folder.parent / f"outside-{shard.name}"
            shutil.move(shard, outside)
            shard.symlink_to(outside)

    cases = [
        ("pipe-name", manifest_edit(shard_path("pipe:touch PWNED"))),
        ("url-name", manifest_edit(shard_path("https://example.org/x.tar"))),
        ("parent-name", manifest_edit(shard_path("../../etc/passwd"))),
        ("absolute-name", manifest_edit(shard_path("/etc/passwd"))),
        ("nul-name", manifest_edit(shard_path("train/a\x00b.tar"))),
        ("long-name", manifest_edit(shard_path("x" * 5000))),
        ("unicode-name", manifest_edit(shard_path("train/\u202eraw.tar"))),
        ("dash-name", manifest_edit(shard_path("-rf"))),
        ("rows-wrong-type", manifest_edit(lambda m, f: m["splits"]["train"].__setitem__("rows", "many"))),
        ("shards-wrong-type", manifest_edit(lambda m, f: m["splits"]["train"].__setitem__("shards", {"a": 1}))),
        ("splits-list", manifest_edit(lambda m, f: m.__setitem__("splits", [1, 2]))),
        ("languages-wrong-type", manifest_edit(lambda m, f: m.__setitem__("languages", "en"))),
        ("huge-rows", manifest_edit(lambda m, f: m["splits"]["train"]["shards"][0].__setitem__("rows", 10 ** 12))),
        ("negative-rows", manifest_edit(lambda m, f: m["splits"]["train"]["shards"][0].__setitem__("rows", -5))),
        ("manifest-garbage", lambda f: (f / "manifest.json").write_bytes(rng.randbytes(300))),
        ("manifest-not-object", lambda f: (f / "manifest.json").write_text("[]")),
        ("symlink-out", symlink_out),
        ("shard-random-bytes", rewrite_shards(lambda b: rng.randbytes(len(b)))),
        ("shard-truncated", rewrite_shards(lambda b: b[: rng.randint(1, len(b) - 1)])),
        ("shard-empty", rewrite_shards(lambda b: b"")),
        ("shard-hostile-members", rewrite_shards(lambda b: _tar_bytes(_hostile_samples(rng)))),
    ]
    return cases


SHARD_CASES = shard_folder_cases(random.Random(SEED + 1))


def _hostile_copy(base, tmp_path: Path, mutate) -> tuple[Path, Path]:
    corpus, _ = base
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    folder = sandbox / "shards"
    shutil.copytree(corpus.shards, folder)
    mutate(folder)
    return sandbox, folder


@pytest.mark.parametrize("case", SHARD_CASES, ids=lambda c: c[0])
def test_shards_verify_and_eval_on_hostile_folders(base, tmp_path, case):
    name, mutate = case
    corpus, model = base
    sandbox, folder = _hostile_copy(base, tmp_path, mutate)
    rc, err = run_align(["shards", "verify", "shards"], sandbox, [])
    assert "Traceback" not in err, err
    assert rc == 1, f"verify passed a hostile folder ({name}):\n{err}"
    assert all(line.startswith(("FAIL ", "align shards verify:", "[")) for line in err.splitlines() if line.strip()), err
    out = sandbox / "eval"
    rc, err = run_align(["eval", "--model", str(model), "--data", "shards", "--split", "test", "--out", "eval",
                         "--encode.quiet"], sandbox, [out])
    assert_readable(rc, err, "eval")
    assert not (sandbox / "PWNED").exists()


FIT_CASES = [c for c in SHARD_CASES if c[0] in ("pipe-name", "symlink-out", "manifest-garbage", "shard-truncated",
                                                   "shard-hostile-members", "huge-rows")]


@pytest.mark.parametrize("case", FIT_CASES, ids=lambda c: c[0])
def test_tiny_fit_on_hostile_folders(base, tmp_path, case):
    name, mutate = case
    corpus, _ = base
    sandbox, folder = _hostile_copy(base, tmp_path, mutate)
    run = sandbox / "run"
    rc, err = run_align(["fit", "--config", str(T.DEBUG_YAML), "--data.train_shards", "shards",
                         "--data.tokenizer", str(corpus.tokenizer),
                         "--model.encoder.vocab_size", str(corpus.vocab_size), "--trainer.default_root_dir", "run",
                         "--checkpoint.dirpath", "run/ckpt", "--trainer.logger", "false", "--trainer.max_steps", "2",
                         "--trainer.limit_val_batches", "0"], sandbox, [run])
    assert_readable(rc, err, "fit")
    assert not (sandbox / "PWNED").exists()
