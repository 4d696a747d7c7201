"""``align translate``: tiny random-weight models of every family (built here from configs), real CLI runs.

What is checked is what a user gets: the exit code and message, ``OUT/corpus.jsonl``
rows and provenance, the manifest and filter report, that 2 ranks write what 1
rank writes, that a SIGKILLed run resumes without redoing or duplicating a part,
and that the rows go through ``align shards build`` into ``align fit`` with their
languages and on to ``align eval``. Outputs of random weights are gibberish:
mechanics and determinism are tested, not quality.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignment.cli import main
from alignment.translate.codes import LanguageMap, LanguageNotSupported
from alignment.translate.filters import FilterConfig, FilterReport, FilterRunner
from alignment.translate.generate import GenerateConfig, Translator, token_budget_batches
from tests import _training as T
from tests import _translate as X

FAST = ["--generate.beams", "2", "--generate.max_length", "12"]
EXPECTED_DE = {"nllb": "deu_Latn", "m2m100": "de", "mbart50": "de_DE", "marian": None}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nmt")
    return {family: build(root) for family, build in X.BUILDERS.items()}


@pytest.fixture(scope="module")
def english(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "news.en.txt"
    path.write_text("\n".join(X.sentences(24)) + "\n\n", encoding="utf-8")  # a trailing blank line: empty_source
    return path


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def subprocess_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(T.REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_ARRAY_TASK_ID"):
        if key not in extra:
            env.pop(key, None)
    return env


def translate_cmd(*argv) -> list[str]:
    return [sys.executable, "-m", "alignment.cli", "translate", "run", *map(str, argv)]


# --------------------------------------------------------------------------- code maps


@pytest.mark.parametrize("family", X.FAMILIES)
def test_every_family_is_detected_and_maps_bcp47_to_its_codes(models, family):
    translator = Translator(str(models[family]), GenerateConfig(beams=1, max_length=8))
    assert translator.family == family
    assert translator.languages.code("de", flag="--targets") == EXPECTED_DE[family]
    assert translator.device.type == "cpu" and translator.dtype.__repr__() == "torch.float32"
    if family == "nllb":  # script-aware, macrolanguages through CLDR, the model's own spelling accepted
        assert translator.languages.code("zh", flag="--targets") == "zho_Hans"
        assert translator.languages.code("ar", flag="--targets") == "arb_Arab"
    if family == "mbart50":
        assert translator.languages.code("zh-Hans", flag="--targets") == "zh_CN"
        assert translator.languages.code("pt-BR", flag="--targets") == "pt_XX"
    out = translator.translate(X.sentences(5), "en", "de")
    assert len(out) == 5 and all(isinstance(t, str) for t in out)
    assert translator.throughput.sentences == 5 and translator.throughput.sentences_per_second > 0


@pytest.mark.parametrize("family,target,expect", [
    ("nllb", "ja", "no nllb language code for ja (the form is like deu_Latn)"),
    ("m2m100", "fr", "no m2m100 language code for fr"),
    ("mbart50", "el", "no mbart50 language code for el"),
    ("marian", "fr", "translates into de only"),
])
def test_a_language_the_model_lacks_is_a_one_line_error_before_anything_is_written(
        models, english, tmp_path, capsys, family, target, expect):
    out = tmp_path / "run"
    targets = target if family == "marian" else f"de,{target}"
    rc = main(["translate", "run", str(english), "--model", str(models[family]), "--targets", targets,
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"--targets {target}: " in err and expect in err, err
    assert not (out / "run.json").exists()  # fixing the flag and rerunning is not "other settings"


def test_a_round_trip_the_model_cannot_make_is_refused_before_any_compute(models, english, tmp_path, capsys):
    assert main(["translate", "run", str(english), "--model", str(models["marian"]), "--targets", "de",
                 "--filters.min_roundtrip_chrf", "30", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "--filters.min_roundtrip_chrf: translating back from de: " in err and "translates from en, not de" in err
    assert not (tmp_path / "run" / "run.json").exists()


def test_a_missing_input_is_named_before_the_model_loads(english, tmp_path, capsys):
    assert main(["translate", "run", str(english), str(tmp_path / "nope.txt"), "--model", str(tmp_path / "no-model"),
                 "--targets", "de", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"align translate run: error: INPUT {tmp_path / 'nope.txt'}: no such file or folder"
    assert not (tmp_path / "run").exists()


def test_codes_command_lists_what_the_model_knows(models, capsys):
    assert main(["translate", "codes", "--model", str(models["nllb"]), "--languages", "de,zh,eng_Latn"]) == 0
    out = capsys.readouterr().out
    assert "family nllb, it knows 6 nllb code(s)" in out
    assert "de         -> deu_Latn" in out and "zh-Hans    -> zho_Hans" in out and "en         -> eng_Latn" in out


def test_language_map_is_ambiguity_aware():
    lm = LanguageMap("nllb", "m", ["kas_Arab", "kas_Deva", "ace_Latn"])
    assert lm.code("ks-Deva", flag="--targets") == "kas_Deva"
    assert lm.code("ace", flag="--targets") == "ace_Latn"
    with pytest.raises(LanguageNotSupported, match="no nllb language code for fr"):
        lm.code("fr", flag="--targets")


# --------------------------------------------------------------------------- batching and generation


def test_token_budget_batches_are_longest_first_within_budget_and_cover_every_sentence():
    lengths = [5, 30, 7, 7, 2, 64, 1, 30, 12]
    batches = token_budget_batches(lengths, batch_tokens=120, beams=2, max_batch=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [i for b in batches for i in b]
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    assert flat.index(2) < flat.index(3) and flat.index(1) < flat.index(7)  # ties keep input order
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) * 2 <= 120
    assert batches[0] == [5]  # 64 x 2 beams > 120: alone


def test_batched_translation_lands_in_the_right_rows(models):
    """Each sentence's output in a sorted, padded batch equals its output translated alone (greedy, fp32)."""
    texts = X.sentences(8, seed=3)
    batched = Translator(str(models["m2m100"]), GenerateConfig(beams=1, max_length=10, batch_tokens=60))
    alone = Translator(str(models["m2m100"]), GenerateConfig(beams=1, max_length=10, batch_tokens=1))
    assert batched.translate(texts, "en", "de") == alone.translate(texts, "en", "de")
    assert batched.throughput.batches < alone.throughput.batches == len(texts)
    assert len(set(batched.translate(texts, "en", "de"))) > 1, "the tiny model's outputs ignore their input"


# --------------------------------------------------------------------------- runs, parts, resume, merge


@pytest.mark.parametrize("family", ["nllb", "marian"])
def test_run_writes_rows_shards_build_takes_as_is_with_provenance(models, english, tmp_path, capsys, family):
    out = tmp_path / "syn"
    assert main(["translate", "run", str(english), "--model", str(models[family]), "--targets", "de", "--out",
                 str(out), "--part_rows", "10", "--filters.drop_bad", "false", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "sentences/s" in printed and "Filters: 25 rows in, 24 written" in printed
    rows = rows_of(out / "corpus.jsonl")
    assert [r["id"] for r in rows] == [f"news-{i}" for i in range(1, 25)]  # input order; the blank line dropped
    lines = X.sentences(24)
    for row, line in zip(rows, lines):
        assert row["pivot"] == "en" and row["texts"]["en"] == line and set(row["texts"]) == {"en", "de"}
        assert row["provenance"] == {"en": {"origin": "original"},
                                     "de": {"origin": "synthetic", "model": str(models[family]), "from": "en"}}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["corpus"]["rows"] == 24 and len(manifest["parts"]) == 3
    assert manifest["provenance"]["de"] == {"synthetic": {str(models[family]): 24}}
    assert manifest["filters"]["rows"]["dropped"] == {"empty_source": 1}

    shards = tmp_path / "shards"
    assert main(["shards", "build", "--format", "jsonl", str(out / "corpus.jsonl"), "--out", str(shards),
                 "--split", "rest,2,2", "--keep_duplicates"]) == 0
    built = json.loads((shards / "manifest.json").read_text())
    assert built["cleaning"]["rows"]["in"] == 24
    kept = built["cleaning"]["rows"]["kept"]  # the kept empty outputs are the shard build's to drop
    assert built["provenance"] == {"de": {"synthetic": {str(models[family]): built["languages"]["de"]}},
                                   "en": {"original": kept}}
    from alignment.data.manifest import iter_shard_rows, resolve_shards
    row = next(r for _, r in iter_shard_rows(resolve_shards(shards, "train")[0].url))
    assert row.provenance["en"] == {"origin": "original"}
    if family != "nllb":
        return
    # the pivot column of those shards (every split), translated into one more language: what the rows
    # already hold is kept with its provenance, only the new language is generated
    again = tmp_path / "more"
    assert main(["translate", "run", str(shards), "--model", str(models[family]), "--targets", "de,fr", "--out",
                 str(again), "--filters.drop_bad", "false", *FAST]) == 0
    before = {r.id: r for split in ("train", "validation", "test") for s in resolve_shards(shards, split)
              for _, r in iter_shard_rows(s.url)}
    after = rows_of(again / "corpus.jsonl")
    assert sorted(r["id"] for r in after) == sorted(before)
    for row in after:
        old = before[row["id"]]
        assert {k: v for k, v in row["texts"].items() if k != "fr"} == old.texts  # de kept, not retranslated
        assert row["provenance"]["fr"]["origin"] == "synthetic"
        assert {k: v for k, v in row["provenance"].items() if k != "fr"} == old.provenance
    # JSONL rows in the `texts` form go the same way
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"id": "r1", "texts": {"en": "enjl enpmx", "es": "hola"}}) + "\n")
    assert main(["translate", "run", str(jsonl), "--model", str(models[family]), "--targets", "de,es", "--out",
                 str(tmp_path / "j"), "--filters.drop_bad", "false", *FAST]) == 0
    (row,) = rows_of(tmp_path / "j" / "corpus.jsonl")
    assert row["texts"]["es"] == "hola" and row["provenance"]["es"] == {"origin": "original"}
    assert row["provenance"]["de"]["origin"] == "synthetic" and row["id"] == "r1"


def test_two_ranks_write_the_bytes_of_one_and_the_last_one_merges(models, english, tmp_path):
    args = [english, "--model", models["nllb"], "--targets", "de,fr", "--part_rows", "5", *FAST]
    assert main(["translate", "run", *map(str, args), "--out", str(tmp_path / "one")]) == 0
    procs = [subprocess.Popen(translate_cmd(*args, "--out", tmp_path / "two"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=subprocess_env(RANK=str(r), WORLD_SIZE="2"))
             for r in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert (tmp_path / "two" / "corpus.jsonl").read_bytes() == (tmp_path / "one" / "corpus.jsonl").read_bytes()
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert [(p["part"], p["rank"]) for p in manifest["parts"]] == [(i, i % 2) for i in range(5)]
    assert "[rank 0/2]" in results[0][0] and "[rank 1/2]" in results[1][0]


def test_a_killed_run_resumes_without_redoing_or_duplicating_parts(models, english, tmp_path, capsys):
    args = [english, "--model", models["m2m100"], "--targets", "de", "--part_rows", "2", "--generate.beams", "2",
            "--generate.max_length", "32", "--generate.batch_tokens", "8", "--filters.drop_bad", "false"]
    assert main(["translate", "run", *map(str, args), "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "run"
    proc = subprocess.Popen(translate_cmd(*args, "--out", out), env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list((out / "parts").glob("part-*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted((out / "parts").glob("part-*.json"))
    assert 1 <= len(finished) < 13, "the run was not killed mid-way"
    assert not (out / "corpus.jsonl").exists()
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "parts").glob("part-*")}

    capsys.readouterr()
    assert main(["translate", "run", *map(str, args), "--out", str(out)]) == 0  # the same command again
    assert f"{len(finished)} part(s) already finished, kept" in capsys.readouterr().out
    for name, stamp in before.items():  # finished parts untouched: not redone
        if name.endswith(".json") or (out / "parts" / name).with_suffix(".json").name in before:
            path = out / "parts" / name
            assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp, name
    assert (out / "corpus.jsonl").read_bytes() == (tmp_path / "ref" / "corpus.jsonl").read_bytes()
    ids = [r["id"] for r in rows_of(out / "corpus.jsonl")]
    assert len(ids) == len(set(ids)) == 24
    assert not list((out / "parts").glob(".*.partial-*"))

    # other settings on the same folder: refused with the difference named, nothing touched
    corpus = (out / "corpus.jsonl").read_bytes()
    assert main(["translate", "run", *map(str, args[:7]), "--generate.max_length", "32", "--filters.drop_bad", "false", "--out", str(out),
                 "--generate.beams", "3"]) == 1
    assert "holds a run with other settings (beams: 2 recorded, 3 now)" in capsys.readouterr().err
    assert (out / "corpus.jsonl").read_bytes() == corpus


def test_merge_names_the_missing_parts(models, english, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["translate", "run", str(english), "--model", str(models["nllb"]), "--targets", "de",
                 "--part_rows", "10", "--rank", "0", "--world_size", "2", "--out", str(out), *FAST]) == 0
    assert not (out / "corpus.jsonl").exists()
    assert main(["translate", "merge", str(out)]) == 1
    assert "1 of 3 parts unfinished (parts 1)" in capsys.readouterr().err


# --------------------------------------------------------------------------- filters


def test_each_filter_drops_by_its_reason_and_the_report_counts_them(models, tmp_path):
    from alignment.model import DualEncoder
    from alignment.synthetic import tiny_tokenizer

    translator = Translator(str(models["m2m100"]), GenerateConfig(beams=1, max_length=10))
    encoder = tmp_path / "enc"  # a tiny encoder folder, loaded the way `align eval` loads any encoder
    tokenizer = tiny_tokenizer(save_dir=encoder)
    DualEncoder.from_config(DualEncoder.tiny_config(len(tokenizer)), projection_dim=16).save_pretrained(encoder)
    en = "The weather is very nice today and we are going to the park."
    de = "Das Wetter ist heute sehr schön und wir gehen in den Park."
    sources = [en, en, en, en, en]
    outputs = ["", en, "Kurz.", "This is clearly an English sentence, not a German one at all.", de]
    where = [f"in.txt:{i}" for i in range(1, 6)]

    def run(config):
        report = FilterReport()
        keep = FilterRunner(config, report).apply(where, sources, outputs, "en", "de", translator)
        return keep, report.to_dict()

    keep, report = run(FilterConfig())
    assert keep == [False, False, True, True, True]
    assert report["languages"]["de"]["dropped"] == {"copied_source": 1, "empty_output": 1}
    keep, report = run(FilterConfig(max_length_ratio=3.0, check_language=True))
    assert keep == [False, False, False, False, True]
    assert report["languages"]["de"]["dropped"] == {"copied_source": 1, "empty_output": 1, "length_ratio": 1,
                                                    "wrong_language": 1}
    assert "identified as en" in report["examples"]["wrong_language"][0]
    keep, report = run(FilterConfig(min_roundtrip_chrf=99.0))  # gibberish back-translations never reach 99
    assert keep == [False, False, False, False, False]
    assert report["languages"]["de"]["dropped"]["roundtrip_chrf"] == 3
    keep, report = run(FilterConfig(similarity_model=str(encoder), min_similarity=-1.0, min_margin=0.0))
    assert keep == [False, False, True, True, True]  # the embedding filters at bounds every pair meets
    table = FilterReport.merged([report, report]).format_table()
    assert "empty_output" in table and "copied_source" in table and "10 translations, 6 kept" in table

    # embedding filters on sentences the tiny encoder's vocabulary knows: drops are exactly the pairs under
    # the bound, scored independently here with the encoder loaded as `align eval` loads it
    from alignment.evaluate.encode import EncodeConfig, encode_texts
    from alignment.evaluate.encoder import load_encoder
    from alignment.evaluate.search import score_aligned

    src, out = X.sentences(8, seed=5, lang="en"), X.sentences(8, seed=5, lang="de")
    out = out[:5] + out[6:] + out[5:6]  # the last three misaligned
    model, tok, _ = load_encoder(encoder)
    x, y = (encode_texts(model, tok, t, EncodeConfig(quiet=True)) for t in (src, out))
    cosine, margin = (x * y).sum(1), score_aligned(x, y, k=4, margin="ratio", chunk_size=4096, backend="exact")
    assert len(set(cosine.tolist())) > 4, "the tiny encoder does not tell these sentences apart"
    for flag, scores, reason in (("min_similarity", cosine, "similarity"), ("min_margin", margin, "margin")):
        bound = float(scores.median())
        report = FilterReport()
        config = FilterConfig(similarity_model=str(encoder), **{flag: bound})
        keep = FilterRunner(config, report).apply([f"l{i}" for i in range(8)], src, out, "en", "de", translator)
        assert keep == [v >= bound for v in scores.tolist()], reason
        assert report.to_dict()["languages"]["de"]["dropped"] == {reason: sum(v < bound for v in scores.tolist())}

def test_filter_flags_reach_the_report_in_the_manifest(models, english, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["translate", "run", str(english), "--model", str(models["nllb"]), "--targets", "de,fr",
                 "--filters.check_language", "--filters.max_length_ratio", "2", "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    filters = manifest["filters"]
    dropped = sum(sum(v["dropped"].values()) for v in filters["languages"].values())
    assert filters["texts"]["in"] == 48 and filters["texts"]["kept"] == 48 - dropped
    assert manifest["languages"].get("de", 0) == filters["languages"]["de"]["kept"]
    assert printed.startswith("[rank 0/1]") and "Filters: 25 rows in" in printed
    with pytest.raises(SystemExit):
        main(["translate", "run", str(english), "--model", "m", "--targets", "de", "--out", str(out),
              "--filters.max_length_ratio"])
    assert main(["translate", "run", str(english), "--model", "m", "--targets", "de", "--out", str(tmp_path / "x"),
                 "--filters.min_margin", "1.0"]) == 1
    assert "--filters.min_similarity and --filters.min_margin need --filters.similarity_model" in capsys.readouterr().err


# --------------------------------------------------------------------------- back-translation


def test_back_translation_rows_are_anchored_on_the_original_text(models, tmp_path):
    german = tmp_path / "mono.de.txt"
    german.write_text("\n".join(X.sentences(6, lang="de")) + "\n", encoding="utf-8")
    out = tmp_path / "bt"
    assert main(["translate", "run", str(german), "--source", "de", "--via", "en", "--targets", "fr",
                 "--model", str(models["nllb"]), "--out", str(out), "--filters.drop_bad", "false", *FAST]) == 0
    model = str(models["nllb"])
    for row, line in zip(rows_of(out / "corpus.jsonl"), X.sentences(6, lang="de")):
        assert row["pivot"] == "en" and row["texts"]["de"] == line and row["id"].startswith("mono-")
        assert row["provenance"] == {"de": {"origin": "original"},
                                     "en": {"origin": "synthetic", "model": model, "from": "de"},
                                     "fr": {"origin": "synthetic", "model": model, "from": "en"}}


# --------------------------------------------------------------------------- the whole recipe


def test_translate_shards_fit_eval_round_trip(models, english, tmp_path, monkeypatch):
    """Generated rows reach training with their languages: the batches of `align fit` hold the corpus's rows."""
    out, shards = tmp_path / "syn", tmp_path / "shards"
    assert main(["translate", "run", str(english), "--model", str(models["nllb"]), "--targets", "de,fr",
                 "--out", str(out), *FAST]) == 0  # empty outputs dropped here: the shard build keeps every text
    corpus = {r["id"]: sorted(r["texts"]) for r in rows_of(out / "corpus.jsonl")}
    assert main(["shards", "build", "--format", "jsonl", str(out / "corpus.jsonl"), "--out", str(shards),
                 "--split", "rest,4,4", "--rows_per_shard", "8", "--keep_duplicates"]) == 0
    from alignment.synthetic import tiny_tokenizer

    tok = tiny_tokenizer(save_dir=tmp_path / "tok")
    record = tmp_path / "batches.jsonl"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "csv.yaml").write_text("trainer:\n  logger:\n    - class_path: lightning.pytorch.loggers.CSVLogger\n"
                                       "      init_args: {save_dir: runs/debug, name: csv}\n")
    rc = main(["fit", "--config", str(T.DEBUG_YAML), "--config", "csv.yaml",
               "--data.train_shards", str(shards), "--data.val_shards", str(shards),
               "--data.tokenizer", str(tmp_path / "tok"), "--model.encoder.vocab_size", str(len(tok)),
               "--data.batch_size", "4", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
               "--trainer.callbacks+=tests._translate.RecordBatches", f"--trainer.callbacks.init_args.path={record}"])
    assert rc == 0
    seen = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(seen) == 3
    for batch in seen:
        for row_id, languages in batch.items():
            assert languages == corpus[row_id], row_id  # the synthetic de/fr texts of that row were trained on
    assert {lang for b in seen for langs in b.values() for lang in langs} == {"en", "de", "fr"}
    ckpt = tmp_path / "runs" / "debug" / "checkpoints" / "last.ckpt"
    assert main(["eval", "--model", str(ckpt), "--data", str(shards), "--split", "test", "--out",
                 str(tmp_path / "eval"), "--encode.quiet"]) == 0
    results = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert results["summary"]["languages"] == ["de", "en", "fr"]  # the synthetic languages are evaluated
    assert {"retrieval_acc/en-de", "retrieval_acc/en-fr", "retrieval_acc/de-fr"} <= set(results["metrics"])


@pytest.mark.parametrize("env,slot", [
    ({}, (0, 1)),
    ({"RANK": "3", "WORLD_SIZE": "8"}, (3, 8)),  # torchrun
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4"}, (1, 4)),  # srun
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4)),  # --array=5-8
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (3, 4)),
])
def test_ranks_come_from_the_launcher(env, slot):
    from alignment.distributed import launcher_slot

    assert launcher_slot(env) == slot
