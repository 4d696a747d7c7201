"""``benchmarks/train_throughput.py``: the benchmark's code path runs end to end, and its comparison is fair.

One module-scoped run of the real benchmark (tiny random encoder, synthetic rows, 1 warm-up + 2 timed
steps per arm, one round: about 10-20 s on 2 cores) feeds the report checks; the loss-equivalence and
FLOP-count tests need no training.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


tt = _load_benchmark()
ST_MISSING = tt.st_missing()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    rc = tt.main(["--warmup-steps", "1", "--steps", "2", "--rounds", "1", "--batch-size", "8", "--max-length", "32",
                  "--min-words", "3", "--max-words", "10", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    (js,) = out.glob("train_throughput-*-tiny-*.json")
    (md,) = out.glob("train_throughput-*-tiny-*.md")
    return json.loads(js.read_text()), md.read_text()


def test_framework_and_hand_arms_report_throughput(report):
    results, md = report
    for arm in ("framework", "hand"):
        s = results["summary"][arm]
        assert s["sentences_per_s"] > 0 and s["real_tokens_per_s"] > 0 and s["model_tflops_per_s"] > 0
        assert s["padded_tokens_per_s"] >= s["real_tokens_per_s"]
    (m,) = [m for m in results["measurements"] if m["arm"] == "framework"]
    assert m["steps"] == 2 and len(m["step_seconds"]) == 2
    assert m["sentences"] == 2 * 2 * 8  # 2 timed steps x 8 pairs x 2 languages
    assert results["ratios"]["framework/hand"]["median"] > 0
    assert results["config"]["precision"] == "fp32" and results["peak"]["tflops"] is None
    assert "| framework/hand |" in md and results["command"] in md and results["date"][:10] in md


def test_every_arm_starts_from_the_same_loss(report):
    """Same weights, batch and loss: the first batch's loss agrees across the arms (eval mode, fp32)."""
    check = report[0]["loss_check"]
    assert check["max_abs_diff"] < 1e-4
    assert check["framework"] == pytest.approx(check["hand"], abs=1e-4)


@pytest.mark.skipif(ST_MISSING is not None, reason=f"sentence-transformers arm not runnable: {ST_MISSING}")
def test_sentence_transformers_arm(report):
    results, md = report
    assert results["summary"]["sentence-transformers"]["sentences_per_s"] > 0
    assert "framework/sentence-transformers" in results["ratios"]
    check = results["loss_check"]
    assert check["sentence-transformers"] == pytest.approx(check["framework"], abs=1e-4)
    # its collator tokenised the same texts into the same tokens as the framework's stream
    assert check["st_real_tokens_first_batch"] == check["framework_real_tokens_first_batch"]
    assert "| framework/sentence-transformers |" in md


def _unit_pairs(batch: int = 6, dim: int = 16, seed: int = 0):
    """``(raw, emb, rows, langs)``: emb = normalize(raw), laid out like a Batch (rows of (de, en))."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(2 * batch, dim, generator=g).requires_grad_(True)  # what the encoder would output
    rows = torch.arange(batch).repeat_interleave(2)
    langs = torch.tensor([0, 1]).repeat(batch)  # 0 = de, 1 = en (the pivot)
    return raw, F.normalize(raw, dim=-1), rows, langs


def _grad(loss, raw):
    (grad,) = torch.autograd.grad(loss, raw, retain_graph=True)
    return grad


def test_framework_en_x_one_direction_is_the_hand_loss():
    """``en_x`` with ``bidirectional=False`` is exactly one-directional in-batch InfoNCE (loss and gradients)."""
    from alignment.losses import GlobalCandidates, multiway_infonce

    raw, emb, rows, langs = _unit_pairs()
    cands = GlobalCandidates.single(emb, rows, langs)
    ours = multiway_infonce(emb, cands, objective="en_x", temperature=0.05, bidirectional=False, pivot_lang_id=1)
    hand = tt.hand_loss(emb[langs == 1], emb[langs == 0], scale=20.0)
    assert ours["contrastive_loss"].item() == pytest.approx(hand.item(), rel=1e-6)
    torch.testing.assert_close(_grad(ours["contrastive_loss"], raw), _grad(hand, raw))


@pytest.mark.skipif(ST_MISSING is not None, reason=f"sentence-transformers not runnable: {ST_MISSING}")
def test_mnrl_is_the_hand_loss():
    """sentence-transformers' MultipleNegativesRankingLoss(scale=20) on (anchor=en, positive=de) is the same maths."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    raw, emb, _, langs = _unit_pairs(seed=1)
    # MNRL's cos_sim normalises again: a no-op on unit vectors, for the value and the gradient alike
    mnrl = MultipleNegativesRankingLoss(model=None, scale=20.0).compute_loss_from_embeddings(
        [emb[langs == 1], emb[langs == 0]], labels=None)
    hand = tt.hand_loss(emb[langs == 1], emb[langs == 0], scale=20.0)
    assert mnrl.item() == pytest.approx(hand.item(), rel=1e-6)
    torch.testing.assert_close(_grad(mnrl, raw), _grad(hand, raw))


def test_flops_of_an_xlm_roberta_base_sized_encoder(tmp_path):
    """The ``--model-config xlm-roberta-base`` architecture has XLM-R base's 278M parameters, 85M in its layers."""
    tt.MODEL_CONFIGS["xlm-roberta-base"](1000, 0, 128).save_pretrained(str(tmp_path))
    flops = tt.FlopModel.of(str(tmp_path), max_length=128)
    assert (flops.layers, flops.hidden) == (12, 768)
    assert flops.layer_params == 12 * 7_087_872  # q, k, v, o + FFN 768 -> 3072 -> 768 + two LayerNorms
    assert flops.total_params == 278_043_648
    n, width = 64, 128
    assert flops.batch_flops(n, width) == n * width * (6 * flops.layer_params + 12 * 12 * 768 * width)


def test_peak_table_and_overrides():
    assert tt.lookup_peak("NVIDIA H100 80GB HBM3") == ("H100", 989.0)
    assert tt.lookup_peak("NVIDIA H100 PCIe") == ("H100 PCIe", 756.0)
    assert tt.lookup_peak("NVIDIA H200") == ("H200", 989.0)
    assert tt.lookup_peak("NVIDIA A100-SXM4-80GB") == ("A100", 312.0)
    assert tt.lookup_peak("Tesla T4") is None
    assert tt.peak_tflops(torch.device("cpu"), False, None)[0] is None
    assert tt.peak_tflops(torch.device("cpu"), False, 2.5) == (2.5, "--peak-tflops")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--arms", "framework,nope"], "--arms: unknown arm 'nope'"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--warmup-steps", "0"], "--warmup-steps must be >= 1"),
        (["--min-words", "9", "--max-words", "4"], "--max-words (4) must be >= --min-words (9)"),
        (["--model", "x", "--tokenizer", "y"], "--tokenizer goes with --model-config"),
        (["--arms", "framework,framework-packed"], "--arms framework-packed: needs --model-config with --attention-dropout 0"),
        (["--attention-dropout", "1.5"], "--attention-dropout goes with --model-config and must be in [0, 1)"),
    ],
)
def test_bad_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        tt.parse_args(argv)
    assert message in capsys.readouterr().err


def test_too_few_rows_names_the_flags():
    pytest.importorskip("django", reason="the gettext corpus comes from the [demo] extra's Django wheel")
    pytest.importorskip("wagtail", reason="the gettext corpus comes from the [demo] extra's Wagtail wheel")
    with pytest.raises(SystemExit, match=r"--min-words 400.*--batch-size x \(--warmup-steps \+ --steps\)"):
        tt.corpus_rows("gettext", 16, min_words=400, max_words=400, seed=0)


def test_packed_arm_trains_the_same_model(tmp_path):
    """The unpadded framework arm (on CPU: the exact reference of the varlen kernel) starts from the same loss
    and processes no padding; its throughput is compared with the padded framework's and the hand loop's."""
    rc = tt.main(["--arms", "framework,framework-packed,hand", "--attention-dropout", "0", "--warmup-steps", "1",
                  "--steps", "1", "--rounds", "1", "--batch-size", "4", "--max-length", "24", "--min-words", "3",
                  "--max-words", "8", "--device", "cpu", "--num-workers", "0", "--out", str(tmp_path)])
    assert rc == 0
    (js,) = tmp_path.glob("train_throughput-*.json")
    results = json.loads(js.read_text())
    check = results["loss_check"]
    assert abs(check["framework-packed"] - check["framework"]) < 1e-5 and abs(check["framework"] - check["hand"]) < 1e-5
    packed = results["summary"]["framework-packed"]
    assert packed["padded_tokens_per_s"] == pytest.approx(packed["real_tokens_per_s"])  # no padding processed
    assert {"framework-packed/hand", "framework-packed/framework", "framework/hand"} <= set(results["ratios"])
    assert results["config"]["attention_dropout"] == 0
