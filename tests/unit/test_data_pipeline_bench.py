"""benchmarks/data_pipeline.py end to end on synthetic shards: every arm reads every row, the pre-tokenised arm
gives the same tokens without a tokenizer call, and the report states the whole-epoch and after-first-batch
rates against the targets."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("data_pipeline", ROOT / "benchmarks" / "data_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("data_pipeline", module)  # dataclasses look their module up there
    spec.loader.exec_module(sys.modules["data_pipeline"])
    return sys.modules["data_pipeline"]


def test_report_has_every_arm_and_both_rates(tmp_path, capsys):
    bench = _module()
    assert bench.main(["--rows", "300", "--repeats", "1", "--workers", "0", "1", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("data_pipeline-*.json")
    report = json.loads(js.read_text())
    results = {(r["name"], r["workers"]): r for r in report["results"]}
    tokens = {r["real_tokens"] for r in report["results"]}
    assert len(tokens) == 1  # the same rows and tokens through every arm
    assert {("pipeline", 0), ("pipeline", 1), (bench.PRETOKENISED, 0), (bench.PRETOKENISED, 1)} <= set(results)
    for (_, workers), r in results.items():
        assert r["rows"] == report["rows"] == 300
        if workers is not None:  # a pipeline: its first batch came first, the rest after
            assert 0 < r["first_batch_s"] <= r["seconds"] and 0 <= r["steady_seconds"] < r["seconds"]
    verdict = report["verdict"]
    assert "whole epoch" in verdict and "after the first batch" in verdict and "target >= 3x" in verdict
    (md,) = tmp_path.glob("data_pipeline-*.md")
    assert "steady tokens/s (after the 1st batch)" in md.read_text()
