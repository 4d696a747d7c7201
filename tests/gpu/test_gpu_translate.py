"""GPU-only: ``align translate run`` in bf16 on CUDA, and the same rows as a second run (determinism).

Skipped, with the reason printed, where CUDA is missing. The model is the tiny
random-weight NLLB-architecture one (:mod:`alignment.translate.tiny`; the 600M-sized one is
``benchmarks/translate_speed.py``'s, kept out of this stage's time budget), so nothing is downloaded;
outputs are gibberish, what is checked is the dtype the run chose, its speed line and that two runs
write the same bytes.
"""

from __future__ import annotations

import json

import pytest
import torch

from alignment.cli import main
from alignment.translate import tiny
from alignment.translate.generate import GenerateConfig, Translator

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 generation); none here")]


def test_bf16_generation_on_gpu_is_deterministic(tmp_path, capsys):
    model = tiny.build_nllb(tmp_path)
    translator = Translator(str(model), GenerateConfig(beams=4, max_length=32))
    assert translator.device.type == "cuda"
    assert translator.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert next(translator.model.parameters()).dtype == translator.dtype
    del translator
    text = tmp_path / "news.en.txt"
    text.write_text("\n".join(tiny.sentences(256)) + "\n", encoding="utf-8")
    for out in ("a", "b"):
        assert main(["translate", "run", str(text), "--model", str(model), "--targets", "de,zh", "--out",
                     str(tmp_path / out), "--generate.max_length", "32", "--filters.drop_bad", "false", "--part_rows", "128"]) == 0
    assert "sentences/s" in capsys.readouterr().out
    assert (tmp_path / "a" / "corpus.jsonl").read_bytes() == (tmp_path / "b" / "corpus.jsonl").read_bytes()
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["settings"]["dtype"] == "auto" and manifest["corpus"]["rows"] == 256
