"""``benchmarks/ablation.py`` end to end on tiny shards and a tiny random encoder, plus its monolingual check.

The script's real path (the demo config and a paths file, ``align fit`` and
``align eval`` in subprocesses, the monolingual structure check, aggregation,
the report) runs for the baseline, the hard-negative arm (mining a copy of the shards) and the post-hoc
centring row, 1 seed, 2 steps, so it cannot rot. The numbers of
a random encoder mean nothing; what is checked is that every number is there,
finite, and under the arm that produced it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
LANGS = ["en", "de", "fr", "es", "ja", "ko"]  # demo.yaml trains en, de, fr, es (+ ru, zh-Hans, ar absent here)


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("ablation", REPO / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ab = _load_benchmark()


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    """A demo_out-like folder: shards/ of 120 synthetic rows (30% held out) and e5/, a saved tiny random encoder."""
    from alignment.cli import main
    from alignment.model import DualEncoder
    from alignment.synthetic import synthetic_rows, tiny_tokenizer

    root = tmp_path_factory.mktemp("ablation")
    jsonl = root / "rows.jsonl"
    with open(jsonl, "w") as fh:
        for row in synthetic_rows(120, LANGS, seed=5, missing_prob=0.1):
            fh.write(json.dumps({"id": row.id, "texts": row.texts}) + "\n")
    assert main(["shards", "build", "--format", "jsonl", str(jsonl), "--out", str(root / "shards"),
                 "--rows_per_shard", "20", "--split", "0.6,0.1,0.3"]) == 0  # fmt: skip
    tokenizer = tiny_tokenizer(save_dir=root / "e5")
    torch.manual_seed(0)
    DualEncoder.from_config(DualEncoder.tiny_config(len(tokenizer))).save_pretrained(root / "e5")
    return root


def test_structure_spearman_against_a_loop():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 5))
    b = a + 0.5 * rng.normal(size=(7, 5))
    sims = lambda x: [float(x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j]))  # noqa: E731
                      for i in range(7) for j in range(i + 1, 7)]  # fmt: skip
    sa, sb = sims(a), sims(b)
    rank = lambda v: [sorted(v).index(x) for x in v]  # noqa: E731 - no ties among random cosines
    ra, rb = np.array(rank(sa), float), np.array(rank(sb), float)
    expected = 1 - 6 * np.sum((ra - rb) ** 2) / (len(ra) * (len(ra) ** 2 - 1))
    assert ab.structure_spearman(a, b) == pytest.approx(expected, abs=1e-12)
    assert ab.structure_spearman(a, 3.0 * a) == pytest.approx(1.0)  # scale-free: cosines
    assert math.isnan(ab.structure_spearman(a[:2], b[:2]))


def test_choose_combination_takes_only_additions():
    summary = {"baseline": {"acc/all": {"mean": 0.5}}, "a": {"acc/all": {"mean": 0.6}},
               "b": {"acc/all": {"mean": 0.4}}, "c": {"acc/all": {"mean": 0.7}},
               "no_duplicate_mask": {"acc/all": {"mean": 0.9}}, "mask_texts": {"acc/all": {"mean": 0.8}},
               "baseline+centring": {"acc/all": {"mean": 0.95}}}  # fmt: skip
    # Removing or changing a default, and a post-hoc map, never enter the combination as additions.
    assert ab.choose_combination(summary, list(summary)) == ["c", "a"]
    assert ab.matryoshka_dims(384) == [64, 128, 256] and ab.matryoshka_dims(32) == [8, 16]


def test_arm_flags_plan_and_labels(tmp_path):
    """The duplicate-mask control is the Literal's ``off``; hard negatives train on the mined copy with K; the
    post-hoc rows come after the trained arms and need the baseline; the report reads a removal as a removal."""
    kw = {"steps": 10, "teacher": "t", "width": 384, "mined": tmp_path / "copy", "k": 3}
    assert ab.arm_flags("no_duplicate_mask", **kw) == ["--model.loss.mask_duplicates", "off"]
    assert ab.arm_flags("mask_texts", **kw) == ["--model.loss.mask_duplicates", "texts"]
    assert ab.arm_flags("hard_negatives", **kw) == ["--data.train_shards", str(tmp_path / "copy"),
                                                    "--data.hard_negatives", "3"]  # fmt: skip
    encoder = tmp_path / "e5"
    encoder.mkdir()
    (encoder / "config.json").write_text('{"hidden_size": 32}')
    base = ["--encoder", str(encoder), "--shards", str(tmp_path / "s"), "--config", str(REPO / "configs" / "demo.yaml"),
            "--work_dir", str(tmp_path / "w")]  # fmt: skip
    arms, flags = ab.plan_arms(ab.parse_args(base))
    assert arms[0] == "baseline" and arms[-1] == "combined" and "mask_texts" not in arms
    assert arms.index("baseline+centring") > arms.index("no_duplicate_mask") > arms.index("hard_negatives")
    assert flags["hard_negatives"][-1] == "2" and flags["baseline+centring"] == []
    with pytest.raises(SystemExit, match="need the baseline"):
        ab.plan_arms(ab.parse_args([*base, "--arms", "drift,baseline+centring"]))
    with pytest.raises(SystemExit, match="between 1 and 4"):
        ab.parse_args([*base, "--hard_negatives", "5"])
    stat = lambda m, sd=None: {"mean": m, "sd": sd}  # noqa: E731
    summary = {"baseline": {"acc/all": stat(0.5, 0.01)}, "no_duplicate_mask": {"acc/all": stat(0.4, 0.01)},
               "baseline+centring": {"acc/all": stat(0.6, 0.01)}, "drift": {"acc/all": stat(0.55, 0.01)}}  # fmt: skip
    lines = dict(zip(("no_duplicate_mask", "baseline+centring", "drift"), ab.outcome_lines(summary, 3)))
    assert "removes the default mask: the mask itself is worth +0.100" in lines["no_duplicate_mask"]
    assert "post-hoc, no training" in lines["baseline+centring"] and "(addition; helps)" in lines["drift"]


def test_every_arm_command_parses(tmp_path, capsys, monkeypatch):
    """The flags of every arm, the mining and the fit-map commands are accepted by the CLI as it is now
    (``--print_config``: parsed and checked, nothing run)."""
    from alignment.cli import main

    monkeypatch.setattr(sys, "argv", ["align"])
    flags = {a: ab.arm_flags(a, steps=10, teacher="t", width=384, mined=tmp_path / "copy") for a in
             ["baseline", *ab.ADDITIONS, *ab.CONTROLS]}  # fmt: skip
    run_dir = tmp_path / "run"
    ab.write_paths(run_dir, tmp_path / "e5", tmp_path / "shards")
    every = [f for a in ["mask_texts", *(a for a in flags if a != "mask_texts")] for f in flags[a]]  # one parse checks each value; the last one wins
    commands = [ab.fit_args("configs/demo.yaml", run_dir, seed=0, steps=3, freeze_layers=11, flags=every, extra=[])]
    commands += [ab.mine_args(tmp_path / "copy", tmp_path / "e5", 48),
                 ab.fit_map_args(tmp_path / "export", tmp_path / "shards", "centring", run_dir)]  # fmt: skip
    monkeypatch.chdir(REPO)
    for argv in commands:
        with pytest.raises(SystemExit) as stop:
            raise SystemExit(main([*argv, "--print_config"]))
        assert stop.value.code in (0, None), (argv, capsys.readouterr().err[-2000:])
    out = capsys.readouterr().out
    assert "mask_duplicates: 'off'" in out or "mask_duplicates: off" in out
    assert "hard_negatives: 2" in out and "kind: centring" in out


def test_benchmark_end_to_end(demo_out, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the base config path is relative to the repository root
    for name, value in {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    argv = ["--demo_out", str(demo_out), "--arms", "baseline,hard_negatives,baseline+centring", "--seeds", "0", "--steps", "2",
            "--max_rows", "12", "--freeze_layers", "0", "--work_dir", str(tmp_path / "work"), "--tag", "smoke", "--fit_args", "--data.batch_size 4"]  # fmt: skip
    assert ab.main([*argv, "--out", str(out)]) == 0
    (md_path,) = out.glob("ablation-*-smoke-*.md")
    report = json.loads(md_path.with_suffix(".json").read_text())
    md = md_path.read_text()
    held = report["summary"]["held-out"]
    assert list(held) == ["zero-shot", "baseline", "baseline+centring", "hard_negatives"]
    for arm, cols in held.items():
        for key in ("acc/trained", "acc/unseen", "acc/x_y", "acc/all", "xsim/all", "lang_id_acc", "mono/trained",
                    "mono/unseen"):  # fmt: skip
            value = cols[key]["mean"]
            assert value is not None and math.isfinite(value), (arm, key)
            assert cols[key]["n"] == 1 and cols[key]["sd"] is None
    assert held["zero-shot"]["mono/all"]["mean"] == pytest.approx(1.0)  # the starting model against itself
    runs = {r["arm"]: r for r in report["runs"]}
    work = tmp_path / "work"
    assert runs["hard_negatives"]["flags"] == ["--data.train_shards", str(work / "shards-mined"),
                                               "--data.hard_negatives", "2"]  # fmt: skip
    # Mined into the copy, never into the demo's shards; the negatives joined the batches (more rows per step).
    assert "negatives" in json.loads((work / "shards-mined" / "manifest.json").read_text())
    assert "negatives" not in json.loads((demo_out / "shards" / "manifest.json").read_text())
    assert report["mined"]["command"].startswith("align mine-negatives --shards " + str(work / "shards-mined"))
    assert runs["hard_negatives"]["train"]["rows_per_step"] > runs["baseline"]["train"]["rows_per_step"] == 4
    # The post-hoc row: fit-map on the baseline's export, its routed export evaluated (mono check through the route).
    assert runs["baseline+centring"]["fit_command"].startswith("align fit-map --model " + str(work / "baseline-seed0"))
    assert held["baseline+centring"]["mono/trained"]["mean"] != held["baseline"]["mono/trained"]["mean"]
    assert runs["baseline"]["fit_command"].startswith("align fit --config configs/demo.yaml --config ")
    assert "--trainer.max_steps 2" in runs["hard_negatives"]["fit_command"]
    assert runs["baseline"]["train"]["train_loss"] is not None
    # The arm really trained: its export differs from the starting encoder.
    from safetensors.torch import load_file

    start = load_file(str(next((demo_out / "e5").glob("*.safetensors"))))
    trained = load_file(str(next((work / "hard_negatives-seed0" / "export").rglob("*.safetensors"))))
    assert any(not torch.equal(start[k], trained[k]) for k in start if k in trained)
    for label in ("| zero-shot (starting encoder) |", "| baseline |", "| hard negatives (K=2 of 4 mined) |",
                  "| baseline + centring (post-hoc, no training) |", "mono ρ trained", "mined once"):
        assert label in md
    assert report["command"] in md and "2 steps of 4 rows" in report["settings"]["budget"]
    assert "Combination: not requested" in md
    md_path.unlink()
    assert ab.main(["--render", str(md_path.with_suffix(".json"))]) == 0
    assert md_path.read_text() == md
    # --reuse: the finished runs are taken from their run.json, nothing is trained or evaluated again.
    assert (tmp_path / "work" / "baseline-seed0" / "run.json").exists()
    monkeypatch.setattr(ab, "run_align", lambda *a, **k: pytest.fail("--reuse ran a command"))
    assert ab.main([*argv, "--reuse", "--out", str(tmp_path / "again")]) == 0
    again = json.loads(next((tmp_path / "again").glob("ablation-*.json")).read_text())
    assert again["summary"] == report["summary"] and again["runs"] == report["runs"]
