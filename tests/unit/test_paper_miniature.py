"""``benchmarks/paper_miniature.py`` end to end on a tiny synthetic corpus and a tiny random encoder.

The benchmark's real code path (demo config, ``align fit`` per arm through the
LightningCLI, the data replay that does the pair accounting and its check
against the training log, ``align eval``, grouping, aggregation, report) runs
for 2 steps per arm and one seed, so the script cannot rot. The numbers of a
random 2-layer encoder mean nothing; the accounting and the plumbing are what
is checked, plus the pure helpers on hand-made inputs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TRAIN, UNSEEN_PRESENT, ABSENT = ["en", "de", "fr"], ["es", "ja"], "ko"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("paper_miniature", REPO / "benchmarks" / "paper_miniature.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


pm = _load_benchmark()


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    """Shards of 160 synthetic rows in 5 languages (30% test) and a saved tiny random encoder + tokenizer."""
    from alignment.cli import main
    from alignment.model import DualEncoder
    from alignment.synthetic import synthetic_rows, tiny_tokenizer

    root = tmp_path_factory.mktemp("miniature")
    jsonl = root / "rows.jsonl"
    with open(jsonl, "w") as fh:
        for row in synthetic_rows(160, [*TRAIN, *UNSEEN_PRESENT], seed=3, missing_prob=0.2):
            fh.write(json.dumps({"id": row.id, "texts": row.texts}) + "\n")
    shards = root / "shards"
    assert main(["shards", "build", "--format", "jsonl", str(jsonl), "--out", str(shards), "--rows_per_shard", "20",
                 "--split", "0.6,0.1,0.3"]) == 0  # fmt: skip
    encoder = root / "encoder"
    tokenizer = tiny_tokenizer(save_dir=encoder)
    torch.manual_seed(0)
    DualEncoder.from_config(DualEncoder.tiny_config(len(tokenizer))).save_pretrained(encoder)
    return shards, encoder


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next(folder.glob("*.safetensors"))))


def test_benchmark_end_to_end(assets, tmp_path, monkeypatch):
    shards, encoder = assets
    monkeypatch.chdir(REPO)  # the base config path is relative to the repository root
    for name, value in {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(name, value)
    out, work = tmp_path / "out", tmp_path / "work"
    rc = pm.main(["--shards", str(shards), "--encoder", str(encoder), "--train-languages", ",".join(TRAIN),
                  "--unseen-languages", ",".join([*UNSEEN_PRESENT, ABSENT]), "--rows", "4", "--k", "3",
                  "--steps", "2", "--seeds", "0", "--work-dir", str(work), "--out", str(out),
                  # configs/demo.yaml freezes the lower 8 of E5's 12 layers; this tiny encoder has 2
                  "--fit-arg=--model.encoder.freeze_layers=0"])  # fmt: skip
    assert rc == 0
    (md_path,) = out.glob("paper_miniature-*.md")
    report = json.loads(md_path.with_suffix(".json").read_text())
    md = md_path.read_text()

    # Languages: the absent unseen language is reported, not evaluated.
    assert report["settings"]["unseen_present"] == UNSEEN_PRESENT
    assert report["settings"]["missing_unseen"] == [ABSENT]
    assert report["settings"]["eval_languages"] == [*TRAIN, *UNSEEN_PRESENT]

    # The design: equal nominal pairs per step (4 rows x 3 pairs = 12 En-X rows), equal sentences for the secondary arm.
    arms = {a["name"]: a for a in report["arms"]}
    assert arms["multiway"]["nominal_pairs_per_step"] == arms["enx"]["nominal_pairs_per_step"] == 12
    assert arms["enx"]["rows"] == 12 and arms["enx_sentences"]["rows"] == 6
    assert arms["enx_sentences"]["nominal_sentences_per_step"] == arms["multiway"]["nominal_sentences_per_step"] == 12

    runs = {r["arm"]: r for r in report["runs"]}
    assert set(runs) == {"multiway", "enx", "enx_sentences"}
    for name, run in runs.items():
        acc = run["accounting"]
        assert acc["steps"] == 2 and run["log_check"]["steps_checked"] == 2
        assert run["log_check"]["matches"], run["log_check"]  # the trained batches are the replayed ones
        assert run["resolved_config"]["model"]["loss"]["objective"] == arms[name]["objective"]
        assert run["resolved_config"]["data"]["language_policy"] == arms[name]["policy"]
        assert run["fit_command"].startswith("align fit --config configs/demo.yaml")
        # Real training happened: the export differs from the starting encoder.
        export = Path(run["fit_command"].split("--export.dir ")[1].split()[0])
        start, trained = _weights(encoder), _weights(export)
        assert any(not torch.equal(start[k], trained[k]) for k in start if k in trained)
        for group in pm.GROUPS:
            assert 0.0 <= run["eval"]["accuracy"][group] <= 1.0
    for name in ("enx", "enx_sentences"):
        per = runs[name]["accounting"]["per_step_mean"]
        assert per["pairs"] == per["pivot_pairs"] == per["rows"] and per["sentences"] == 2 * per["rows"]
    mw = runs["multiway"]["accounting"]["per_step_mean"]
    assert 2 * mw["rows"] <= mw["sentences"] <= 3 * mw["rows"] and mw["pairs"] <= 3 * mw["rows"]
    assert mw["pivot_pairs"] < mw["pairs"]  # X-Y pairs too: the multi-way difference

    # The report: the three arms, the zero-shot row, the paired difference, the command.
    assert "| zero-shot |" in md and "| multi-way (k=3) |" in md and "| En-X, equal pairs |" in md
    assert "multi-way − En-X, equal pairs (paired by seed)" in md
    assert report["command"] in md and "log matches replay" in md
    assert report["summary"]["multiway"]["acc/all"]["n"] == 1 and report["summary"]["multiway"]["acc/all"]["sd"] is None
    # --render re-writes the same Markdown from the JSON.
    md_path.unlink()
    assert pm.main(["--render", str(md_path.with_suffix(".json"))]) == 0
    assert md_path.read_text() == md


def _pair(src: str, tgt: str, acc: float, xsim: float) -> dict:
    return {"src": src, "tgt": tgt, "accuracy": acc, "xsim_error": xsim}


def test_summarize_eval_groups_pairs():
    metrics = {
        "retrieval": {"pairs": [
            _pair("en", "de", 0.9, 0.1), _pair("de", "fr", 0.7, 0.3), _pair("de", "ja", 0.5, 0.5),
            _pair("ja", "ko", 0.2, 0.8), _pair("ko", "ja", 0.4, 0.6),
        ]},
        "metrics": {"retrieval_acc_by_lang/de": 0.6, "lang_id_acc": 0.9, "cos_gap": 0.2, "other": 1.0},
    }  # fmt: skip
    out = pm.summarize_eval(metrics, ["en", "de", "fr"], pivot="en")
    assert out["accuracy"]["en_x"] == 0.9 and out["accuracy"]["x_y"] == 0.7
    assert out["accuracy"]["trained"] == pytest.approx(0.8) and out["accuracy"]["mixed"] == 0.5
    assert out["accuracy"]["unseen"] == pytest.approx(0.3) and out["xsim_error"]["unseen"] == pytest.approx(0.7)
    assert out["accuracy"]["all"] == pytest.approx(0.54)
    assert out["pairs_per_group"] == {"all": 5, "trained": 2, "en_x": 1, "x_y": 1, "unseen": 2, "mixed": 1}
    assert out["per_language"] == {"de": 0.6} and out["diagnostics"] == {"lang_id_acc": 0.9, "cos_gap": 0.2}


def test_stats_and_paired_difference():
    s = pm.stats([0.5, 0.7, None, 0.6])
    assert s["mean"] == pytest.approx(0.6) and s["sd"] == pytest.approx(0.1) and s["n"] == 3
    assert pm.stats([0.5])["sd"] is None and pm.stats([])["mean"] is None
    arms = pm.design_arms(4, 3, ["multiway", "enx"])

    def run(arm, seed, acc):
        groups = {g: acc for g in pm.GROUPS}
        return {"arm": arm, "seed": seed, "eval": {"accuracy": groups, "xsim_error": groups, "per_language": {},
                                                   "diagnostics": {}}}  # fmt: skip

    runs = [run("multiway", 0, 0.6), run("multiway", 1, 0.8), run("enx", 0, 0.5), run("enx", 1, 0.6)]
    summary, diffs = pm.aggregate(runs, arms)
    assert summary["multiway"]["acc/all"]["mean"] == pytest.approx(0.7)
    assert diffs["enx"]["acc/all"]["values"] == pytest.approx([0.1, 0.2])  # paired by seed
    assert math.isclose(diffs["enx"]["acc/all"]["mean"], 0.15)


def test_design_and_bad_input_name_the_flag(assets, tmp_path):
    arms = {a.name: a for a in pm.design_arms(16, 3)}
    assert arms["multiway"].rows * arms["multiway"].nominal_pairs_per_row == arms["enx"].rows == 48
    assert arms["enx_sentences"].rows * 2 == arms["multiway"].rows * 3
    with pytest.raises(ValueError, match="--rows"):
        pm.design_arms(1, 3)
    with pytest.raises(ValueError, match="--k"):
        pm.design_arms(16, 1)
    shards, encoder = assets
    with pytest.raises(ValueError, match=r"--train-languages en,ru: ru not in the test split of --shards"):
        pm.check_languages(shards, ["en", "ru"], [])
    with pytest.raises(ValueError, match="--encoder .* no config.json"):
        pm.ensure_assets(shards, tmp_path, [])
    with pytest.raises(SystemExit):
        pm.parse_args(["--pivot", "ja"])  # the pivot must be trained
    with pytest.raises(SystemExit):
        pm.parse_args(["--unseen-languages", "de,ja"])  # de is trained


def _load_protocol():
    spec = importlib.util.spec_from_file_location("paper_protocol", REPO / "benchmarks" / "paper_protocol.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_paper_protocol_end_to_end(assets, tmp_path, monkeypatch):
    """The paper's protocol (benchmarks/paper_protocol.py): same rows per step, equal epochs, En-X vs k = 2 and all."""
    pp = _load_protocol()
    shards, encoder = assets
    monkeypatch.chdir(REPO)
    for name, value in {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(name, value)
    ood = tmp_path / "ood.jsonl"  # an out-of-domain set: other rows, its own file
    from alignment.synthetic import synthetic_rows

    with open(ood, "w") as fh:
        for row in synthetic_rows(12, [*TRAIN, *UNSEEN_PRESENT], seed=9):
            fh.write(json.dumps({"id": "ood-" + row.id, "texts": row.texts}) + "\n")
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--shards", str(shards), "--encoder", str(encoder), "--ood", str(ood), "--train-languages",
            ",".join(TRAIN), "--unseen-languages", ",".join(UNSEEN_PRESENT), "--rows", "8", "--k", "2", "3",
            "--epochs", "0.25", "--seeds", "0", "--work-dir", str(work), "--out", str(out),
            "--fit-arg=--model.encoder.freeze_layers=0"]  # fmt: skip
    assert pp.main(argv) == 0
    (md_path,) = out.glob("paper_protocol-*.md")
    report = json.loads(md_path.with_suffix(".json").read_text())
    arms = {a["name"]: a for a in report["arms"]}
    assert arms["enx"]["policy"] == "pivot_pair" and arms["mw2"]["policy"] == "k" and arms["mw3"]["policy"] == "all"
    runs = {r["arm"]: r for r in report["runs"]}
    steps = {r["steps"] for r in runs.values()}
    per_epoch = runs["enx"]["batches_per_epoch"]
    assert steps == {math.ceil(0.25 * per_epoch)}  # equal epochs: the same steps of the same rows per step
    for name, run in runs.items():
        assert run["log_check"]["matches"], (name, run["log_check"])
        assert run["accounting"]["per_step_mean"]["rows"] <= 8
        for which in ("held_out", "ood"):
            assert 0.0 <= run[which]["eval"]["accuracy"]["trained"] <= 1.0
    enx, mw3 = runs["enx"]["accounting"]["per_step_mean"], runs["mw3"]["accounting"]["per_step_mean"]
    assert enx["sentences"] == 2 * enx["rows"] and mw3["sentences"] > enx["sentences"]  # all languages per row
    md = md_path.read_text()
    assert "multi-way, all 3 languages − En-X (paired)" in md and "Out-of-domain" in md and "+21.3%" in md
    # a second invocation reuses the finished runs (their run.json) instead of training again
    assert pp.main(argv) == 0
    assert json.loads(sorted(out.glob("paper_protocol-*.json"))[-1].read_text())["runs"] == report["runs"]
