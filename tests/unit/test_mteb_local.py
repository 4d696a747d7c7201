"""MTEB run offline through the bridge on tasks built from local data, checked against `align eval`'s own numbers.

A tiny random encoder is exported (`export_encoder`: the sentence-transformers folder `align export` writes);
`align eval --model EXPORT --data FILE --mteb_local FILE` then computes the project's metrics and MTEB's on the
same file, with the network cut (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, and sockets that refuse to connect).
MTEB's own result files are parsed and their main scores compared with `align eval`'s:

* bitext mining accuracy (cosine nearest neighbour of each source sentence among the target sentences of the
  rows holding both languages) equals `retrieval_acc/<src>-<tgt>` for every ordered pair: the same number of
  correct queries out of the same n <= 48 (MTEB writes its scores rounded to 6 decimals, so the fractions
  agree to 5e-7; one query decided differently would move them by >= 1/48);
* STS cosine Spearman (scipy in MTEB, torchmetrics here) equals `sts_spearman/...` to 1e-6 (MTEB's 6-decimal
  rounding; distinct gold scores, so no tie handling enters).

A random encoder cannot translate; the accuracies are whatever it gives (the rows are made so that identical
strings are planted in one language, giving some hits), the point is that both computations agree.
"""

from __future__ import annotations

import importlib.util
import json
import random
import socket
from pathlib import Path

import pytest
import torch

from alignment.cli import main
from alignment.evaluate import mteb_bridge
from alignment.evaluate.encoder import load_encoder
from alignment.evaluate.mteb_bridge import mteb_problems
from alignment.export import export_encoder
from alignment.model import DualEncoder
from alignment.synthetic import synthetic_rows, tiny_tokenizer

pytest.importorskip("mteb", reason="the [mteb] extra (part of [dev]) is not installed")

LANGS = ["en", "de", "fr"]
PREFIX = "query: "  # E5's prefix for symmetric tasks; a real token sequence ([UNK] ...) for the tiny tokenizer


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A sentence-transformers export of a tiny random encoder (what `align export` writes)."""
    root = tmp_path_factory.mktemp("mteb-export")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    encoder = DualEncoder.from_config(DualEncoder.tiny_config(len(tokenizer)), projection_dim=16)
    encoder.card_extra = {"query_prefix": PREFIX, "passage_prefix": "passage: "}  # E5-like, as `align fit` records
    return export_encoder(encoder, root / "export", tokenizer=tokenizer, max_seq_length=64,
                          prompts={"query": PREFIX, "document": PREFIX})  # what ExportOnFitEnd writes


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Multi-way rows (some languages missing; `fr` copies `en` in a third of the rows) and scored en-de pairs."""
    root = tmp_path_factory.mktemp("mteb-data")
    rows, seen = [], set()
    for i, row in enumerate(synthetic_rows(48, LANGS, seed=3, missing_prob=0.25)):
        texts = dict(row.texts)
        if i % 3 == 0 and "fr" in texts:
            texts["fr"] = texts["en"]  # planted exact translations: some nearest neighbours are right
        if any((lang, t) in seen for lang, t in texts.items()):
            continue  # no duplicate sentence within a language: a tie would make nearest neighbours arbitrary
        seen.update(texts.items())
        rows.append({"id": row.id, "texts": texts})
    rng = random.Random(5)
    en_de = [r["texts"] for r in rows if "de" in r["texts"]]
    pairs = []
    for i, texts in enumerate(en_de[:30]):
        other = en_de[(i + rng.randrange(1, len(en_de))) % len(en_de)]
        partner = texts["de"] if i % 2 else other["de"]
        pairs.append({"texts": {"en": texts["en"], "de": partner}, "score": round(rng.uniform(0, 5), 6) + i * 1e-4})
    return {"rows": _write_jsonl(root / "rows.jsonl", rows), "sts": _write_jsonl(root / "sts.jsonl", pairs)}


@pytest.fixture
def offline(monkeypatch):
    """The hub variables set and every socket refusing to connect: MTEB must not reach for the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def refuse(self, address):
        raise OSError(f"network access attempted in an offline test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _eval(capsys, *argv) -> tuple[int, str, str]:
    code = main(["eval", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _mteb_file(out: Path, task: str) -> dict:
    """MTEB's own result JSON for ``task`` (``<out>/mteb/results/<model>/<revision>/<task>.json``)."""
    found = list((out / "mteb" / "results").glob(f"*/*/{task}.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def test_bitext_mining_through_mteb_matches_align_eval(capsys, offline, export, data, tmp_path):
    out = tmp_path / "eval"
    code, stdout, err = _eval(capsys, "--model", export, "--data", data["rows"], "--mteb_local", data["rows"],
                              "--out", out, "--hubness_k", 0, "--diagnostics", "false")  # fmt: skip
    assert code == 0, err
    result = _mteb_file(out, "LocalBitextMining")
    assert result["task_name"] == "LocalBitextMining" and result["mteb_version"].startswith("2.")
    mteb_acc = {entry["hf_subset"]: entry for entry in result["scores"]["test"]}
    metrics = json.loads((out / "metrics.json").read_text())
    ours = {f"{p['src']}-{p['tgt']}": p for p in metrics["retrieval"]["pairs"]}
    assert set(mteb_acc) == set(ours) and len(ours) == 6  # every ordered pair of en, de, fr
    for key, pair in ours.items():
        entry = mteb_acc[key]
        assert entry["main_score"] == entry["accuracy"]
        n = pair["num_queries"]
        assert round(entry["accuracy"] * n) == round(pair["accuracy"] * n), (key, entry["accuracy"], pair["accuracy"])
        assert abs(entry["accuracy"] - pair["accuracy"]) <= 5e-7
        assert metrics["metrics"][f"mteb/LocalBitextMining/{key}"] == pytest.approx(entry["accuracy"], abs=5e-7)
    assert 0 < mteb_acc["en-fr"]["accuracy"] < 1  # planted copies: some hits, not all
    # the agreement holds because MTEB embeds with the export's query prompt, as align eval does: without it the
    # numbers differ (so the comparison above would notice a prompt MTEB left out)
    plain = tmp_path / "plain"
    assert _eval(capsys, "--model", export, "--data", data["rows"], "--encode.prefix", "", "--out", plain,
                 "--hubness_k", 0, "--diagnostics", "false")[0] == 0  # fmt: skip
    unprefixed = {f"{p['src']}-{p['tgt']}": p["accuracy"] for p in json.loads((plain / "metrics.json").read_text())["retrieval"]["pairs"]}
    assert any(abs(unprefixed[k] - mteb_acc[k]["accuracy"]) > 1e-3 for k in ours)
    # the dataset revision MTEB records is a hash of the task data; the path names the file
    assert len(result["dataset_revision"]) == 16
    summary = {m["subset"]: m for m in metrics["mteb"]}
    assert summary["de-en"]["file"].endswith("LocalBitextMining.json") and summary["de-en"]["metric"] == "accuracy"
    report = (out / "report.md").read_text()
    assert "## MTEB (MTEB's own evaluators and result files)" in report and "LocalBitextMining" in report
    assert "LocalBitextMining" in stdout


def test_sts_through_mteb_matches_align_eval(capsys, offline, export, data, tmp_path):
    out = tmp_path / "sts"
    code, _, err = _eval(capsys, "--model", export, "--data", data["sts"], "--mteb_local", data["sts"], "--out", out)
    assert code == 0, err
    result = _mteb_file(out, "LocalSTS")
    (entry,) = result["scores"]["test"]
    assert entry["hf_subset"] == "en-de" and entry["main_score"] == entry["cosine_spearman"]
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    (ours,) = [v for k, v in metrics.items() if k.startswith("sts_spearman/")]
    assert abs(entry["cosine_spearman"] - ours) <= 1e-6, (entry["cosine_spearman"], ours)
    assert metrics["mteb/LocalSTS/en-de"] == pytest.approx(entry["cosine_spearman"], abs=5e-7)


def test_mteb_only_run_on_a_shard_build_and_bad_local_data(capsys, offline, export, tmp_path):
    """MTEB alone on the held-out split of a shard build (no --data): report.md / metrics.json hold its scores."""
    from alignment.data.build import build_shards
    from alignment.data.shards_write import ShardBuildConfig

    build_shards(synthetic_rows(60, LANGS, seed=4, missing_prob=0.2),
                 ShardBuildConfig(out=tmp_path / "shards", split="rest,10,20", shuffle_buckets=2))  # fmt: skip
    out = tmp_path / "only"
    code, _, err = _eval(capsys, "--model", export, "--mteb_local", tmp_path / "shards", "--split", "test",
                         "--languages", "en,de", "--retrieval.pairs", "pivot", "--out", out)  # fmt: skip
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(m["subset"] for m in metrics["mteb"]) == ["de-en", "en-de"]
    result = _mteb_file(out, "LocalBitextMining")
    assert sorted(result["scores"]["test"][0]["languages"]) == ["deu-Latn", "eng-Latn"]
    assert "## MTEB" in (out / "report.md").read_text()

    code, stdout, err = _eval(capsys, "--model", export, "--mteb_local", tmp_path / "missing.jsonl", "--out", out)
    assert code == 1 and "--mteb_local" in err and "missing.jsonl" in err
    one_language = _write_jsonl(tmp_path / "en.jsonl", [{"texts": {"en": "a"}}, {"texts": {"en": "b"}}])
    code, _, err = _eval(capsys, "--model", export, "--mteb_local", one_language, "--out", out)
    assert code == 1 and "--mteb_local" in err and "en.jsonl" in err, err
    # hub task names still need the hub: refused before anything is loaded
    code, _, err = _eval(capsys, "--model", export, "--mteb", "STS22.v2", "--out", out)
    assert code == 1 and "cannot be reached offline (HF_HUB_OFFLINE=1" in err and "--mteb_local" in err
    assert mteb_problems(hub=False) == []



@pytest.mark.parametrize("mteb", [["--mteb_local"], ["--mteb", "STS22.v2", "--mteb_local"]])
def test_bad_input_is_named_before_the_model_loads_or_mteb_runs(capsys, monkeypatch, offline, export, data, tmp_path,
                                                                 mteb):
    """A malformed --data line (or a --maps folder without maps) beside a valid --mteb_local: one error naming the
    flag, file and line, before any model is loaded and before MTEB runs (both made to fail the test if reached)."""
    from alignment.commands import eval as eval_command

    def reached(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} was reached before the inputs were checked")
        return fail

    monkeypatch.setattr(eval_command, "run_mteb", reached("MTEB"))
    monkeypatch.setattr(eval_command, "load_encoder", reached("the model"))
    good = data["rows"].read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*good[:2], '{"id": "x", "texts": {"en": "a", "de": ', *good[2:4]]) + "\n")
    out = tmp_path / "out"
    code, stdout, err = _eval(capsys, "--model", export, "--data", bad, *mteb, data["rows"], "--out", out)
    assert (code, stdout) == (1, ""), err
    assert err.startswith(f"align eval: error: --data: {bad}:3: not JSON"), err
    assert not out.exists()

    code, _, err = _eval(capsys, "--model", export, "--data", data["rows"], "--maps", tmp_path, *mteb, data["rows"],
                         "--out", out)
    assert code == 1 and f"--maps {tmp_path}: {tmp_path} holds no language maps" in err, err

    monkeypatch.setattr(eval_command, "load_encoder", load_encoder)  # the seam is the real one: with good inputs
    monkeypatch.setattr(eval_command, "run_mteb", lambda *a, **k: [])  # MTEB is reached (and the evaluation runs)
    code, _, err = _eval(capsys, "--model", export, "--data", data["rows"], "--mteb_local", data["rows"],
                         "--max_rows", "12", "--out", out)
    assert code == 0 and (out / "metrics.json").is_file(), err


def test_mteb_local_without_mteb_names_the_extra_only(capsys, monkeypatch, export, data):
    """Without the extra, --mteb_local says so and nothing about the network (it needs none).
    (tests/unit/test_eval_cli.py checks the --mteb message the same way.)"""
    real = importlib.util.find_spec
    monkeypatch.setattr(mteb_bridge.importlib.util, "find_spec", lambda name, *a: None if name == "mteb" else real(name, *a))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, stdout, err = _eval(capsys, "--model", export, "--mteb_local", data["rows"])
    assert code == 1 and stdout == ""
    assert "MTEB is not installed" in err and "pip install 'multiway-align[mteb]'" in err and "offline" not in err


def test_config_example_parses():
    from alignment.commands.common import build
    from alignment.commands.eval import EvalRunConfig, parser

    p = parser()
    config = build(p, p.parse_args(["--config", str(Path(__file__).parents[2] / "configs/eval/mteb-local.yaml")]),
                   EvalRunConfig, "eval")  # fmt: skip
    assert (config.mteb_local, config.data, config.retrieval.pairs, config.mteb) == (
        "data/gettext", "data/gettext", "pivot", None)


def test_assembled_folder_defaults_to_the_query_prompt(tmp_path):
    """A saved encoder folder (not an export) is assembled for MTEB with the query prompt as its default, so
    MTEB's prompt-less bitext / STS encoding gets the prefix align eval uses (exactly: same float32 path)."""
    from alignment.evaluate.encode import EncodeConfig, encode_texts
    from alignment.evaluate.encoder import load_encoder
    from alignment.evaluate.mteb_bridge import sentence_transformer_from_spec

    tokenizer = tiny_tokenizer(save_dir=tmp_path / "enc")
    torch.manual_seed(0)
    encoder = DualEncoder.from_config(DualEncoder.tiny_config(len(tokenizer)), projection_dim=16)
    encoder.card_extra = {"query_prefix": PREFIX, "passage_prefix": "passage: "}
    encoder.save_pretrained(tmp_path / "enc")
    texts = [t for r in synthetic_rows(4, LANGS, seed=9) for t in r.texts.values()]
    model, tok, info = load_encoder(tmp_path / "enc")
    ours = encode_texts(model, tok, texts, EncodeConfig(quiet=True), prefix=info.query_prefix)
    st = sentence_transformer_from_spec(tmp_path / "enc")
    assert st.default_prompt_name == "query"
    assert torch.allclose(st.encode(texts, convert_to_tensor=True).cpu(), ours, atol=1e-5)


def test_hub_task_names_and_local_tasks_run_in_one_evaluate_call(capsys, monkeypatch, export, data, tmp_path):
    """The networked path (--mteb NAMES -> mteb.get_tasks) and --mteb_local share one mteb.evaluate call and one
    result folder. Offline here, the hub name resolves to MTEB's own mock bitext task (data in memory)."""
    import mteb
    from mteb.mocks.mock_tasks.bitext_mining import MockBitextMiningTask

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: (_ for _ in ()).throw(OSError("no network")))
    asked, calls = [], []
    monkeypatch.setattr(mteb, "get_tasks", lambda tasks: asked.extend(tasks) or [MockBitextMiningTask()])
    real_evaluate = mteb.evaluate
    monkeypatch.setattr(mteb, "evaluate", lambda model, tasks, **kw: calls.append([t.metadata.name for t in tasks])
                        or real_evaluate(model, tasks, **kw))  # fmt: skip
    out = tmp_path / "both"
    code, _, err = _eval(capsys, "--model", export, "--mteb", "Tatoeba", "--mteb_local", data["rows"], "--out", out)
    assert code == 0, err
    assert asked == ["Tatoeba"] and calls == [["MockBitextMiningTask", "LocalBitextMining"]]
    hub = _mteb_file(out, "MockBitextMiningTask")["scores"]["test"][0]
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["mteb/MockBitextMiningTask/default"] == pytest.approx(hub["main_score"], abs=5e-7)
    assert any(k.startswith("mteb/LocalBitextMining/") for k in metrics)
