"""Packed (unpadded) encoding (``alignment/packing.py``, ``--model.step.unpadded``) on CPU.

The packed path runs here through ``sdpa_varlen``'s exact reference (a block-diagonal mask from the same
``cu_seq_lens`` the CUDA varlen kernel gets; the kernel itself is checked in ``tests/gpu/test_gpu_packing.py``).
In float64 and eval mode, embeddings and parameter gradients of the packed step equal the single padded
forward's (1e-10) for tiny BERT and tiny XLM-R (whose positions start at ``padding_idx + 1``), mean and CLS
pooling, with frozen layers, the drift reference and GradCache. ``auto`` on CPU takes the length-grouped path and
says why; ``on`` with a kernel that cannot pack stops ``align fit`` with one line naming the flag.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from alignment.cli import main
from alignment.losses import total_loss
from alignment.packing import KERNEL, encode_packed, encode_step
from alignment.synthetic import rows_to_batch, synthetic_rows, tiny_tokenizer
from tests import _training as T

TOL = 1e-10


@pytest.fixture(autouse=True)
def _say_again():
    """Which path runs is said once per process: each test starts afresh."""
    from alignment import packing

    packing._said.clear()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def batch(tokenizer):
    """10 rows of up to 4 languages, sentence lengths 1 to 14 words (right padding)."""
    rows = synthetic_rows(10, T.LANGUAGES, seed=11, missing_prob=0.3, min_words=1, max_words=14)
    return rows_to_batch(tokenizer, list(rows), T.LANGUAGES)


def build(tokenizer, unpadded, *, kernel=KERNEL, encoder=None, **kwargs):
    encoder = {"attn_implementation": kernel, **(encoder or {})}
    module = T.module(T.Corpus(Path("."), Path("."), len(tokenizer)), seed=3, encoder=encoder,
                      step={"unpadded": unpadded, "token_budget": 0}, **kwargs).double().eval()
    if module._reference is not None:
        module._reference.double()
    return module


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_packed_step_equals_the_padded_forward(tokenizer, batch, pooling, capsys):
    """The module's step (``_encode`` + loss + drift reference), 1 of 2 layers frozen: same embeddings, loss
    and gradients; the packed forward processes no padding (``train/padding_share`` 0)."""
    kwargs = dict(encoder={"pooling": pooling, "freeze_layers": 1}, loss={"drift_weight": 0.5})
    padded = build(tokenizer, "off", kernel="sdpa", **kwargs)  # transformers' own SDPA, one padded forward
    packed = build(tokenizer, "on", **kwargs)
    with torch.no_grad():  # move the weights off the drift reference, so drift is not zero
        for module in (padded, packed):
            for p in module.encoder.parameters():
                p.add_(0.01 * torch.sin(torch.arange(p.numel(), dtype=p.dtype)).reshape(p.shape))
    calls = []
    backbone = packed.encoder.backbone
    backbone.register_forward_pre_hook(lambda _, args, kw: calls.append(tuple(kw["input_ids"].shape)),
                                       with_kwargs=True)
    emb_p, emb_k = padded._encode(batch), packed._encode(batch)
    real = int(batch.attention_mask.sum())
    assert calls == [(1, real)] and batch.padding_ratio > 0.2  # one sequence of the real tokens only
    assert float(packed._padding.share()) == 0.0
    torch.testing.assert_close(emb_k, emb_p, rtol=TOL, atol=TOL)  # in batch order
    out_p, out_k = padded._loss_terms(emb_p, batch), packed._loss_terms(emb_k, batch)
    assert float(out_p["drift_loss"].detach()) > 0
    torch.testing.assert_close(total_loss(out_k), total_loss(out_p), rtol=TOL, atol=TOL)
    total_loss(out_p).backward()
    total_loss(out_k).backward()
    T.assert_same_grads(T.grads(packed), T.grads(padded))
    assert not any("encoder.backbone.encoder.layer.0." in n for n in T.grads(packed))  # frozen layer: no gradient
    assert "[unpadded] packed path, sdpa_varlen (exact reference: no CUDA" in capsys.readouterr().err


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_packed_xlm_roberta_positions_and_gradients(tokenizer, batch, pooling):
    """XLM-R numbers positions from ``padding_idx + 1``: the packed position ids restart there per sentence."""
    from transformers import XLMRobertaConfig

    from alignment.model import DualEncoder

    config = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, pad_token_id=0, max_position_embeddings=130)
    torch.manual_seed(0)
    padded = DualEncoder.from_config(config, attn_implementation="sdpa", pooling=pooling, freeze_layers=1)
    packed = DualEncoder.from_config(config, attn_implementation=KERNEL, pooling=pooling, freeze_layers=1)
    padded, packed = padded.double().eval(), packed.double().eval()
    packed.load_state_dict(padded.state_dict())
    emb_p, emb_k = padded(batch), encode_packed(packed, batch)
    torch.testing.assert_close(emb_k, emb_p, rtol=TOL, atol=TOL)
    weights = torch.linspace(-1, 1, emb_p.numel(), dtype=emb_p.dtype).reshape(emb_p.shape)
    (emb_p * weights).sum().backward()
    (emb_k * weights).sum().backward()
    T.assert_same_grads({n: p.grad for n, p in packed.named_parameters() if p.grad is not None},
                {n: p.grad for n, p in padded.named_parameters() if p.grad is not None})


def test_packed_gradcache_equals_the_padded_forward(tokenizer, batch):
    kwargs = dict(loss={"objective": "multi_positive", "learn_temperature": True}, gradcache={"chunk_size": 7})
    padded, packed = build(tokenizer, "off", kernel="sdpa", **kwargs), build(tokenizer, "on", **kwargs)
    out_p, out_k = padded._gradcache.step(batch), packed._gradcache.step(batch)
    torch.testing.assert_close(out_k["contrastive_loss"], out_p["contrastive_loss"], rtol=TOL, atol=TOL)
    T.assert_same_grads(T.grads(packed), T.grads(padded))


def test_auto_on_cpu_takes_the_grouped_path_and_says_why(tokenizer, batch, capsys):
    for kernel, reason in (("sdpa", "--model.encoder.attn_implementation sdpa has no variable-length path"),
                           (KERNEL, "no CUDA (cpu)")):
        module = build(tokenizer, "auto", kernel=kernel)
        calls = []
        module.encoder.backbone.register_forward_pre_hook(
            lambda _, args, kw, calls=calls: calls.append(tuple(kw["attention_mask"].shape)), with_kwargs=True)
        emb = encode_step(module.encoder, batch, 24, "auto")
        assert len(calls) > 1 and sum(n for n, _ in calls) == batch.num_sentences  # grouped chunks, not one row
        torch.testing.assert_close(emb, module.encoder(batch), rtol=1e-12, atol=1e-12)
        err = capsys.readouterr().err
        assert f"[unpadded] length-grouped path (--model.step.token_budget): {reason}" in err, err
        encode_step(module.encoder, batch, 24, "auto")
        assert "[unpadded]" not in capsys.readouterr().err  # said once


def test_on_refuses_a_left_padded_batch(tokenizer, batch):
    from dataclasses import replace

    module = build(tokenizer, "on")
    left = replace(batch, attention_mask=batch.attention_mask.flip(1), input_ids=batch.input_ids.flip(1))
    with pytest.raises(ValueError, match=r"--model.step.unpadded on: cannot pack: the batch is not right-padded"):
        encode_step(module.encoder, left, 0, "on")


def _fit(corpus, tmp_path, *extra) -> int:
    return main(["fit", "--config", str(T.DEBUG_YAML), "--data.train_shards", str(corpus.shards),
                 "--data.tokenizer", str(corpus.tokenizer), "--model.encoder.vocab_size", str(corpus.vocab_size),
                 "--trainer.default_root_dir", str(tmp_path / "run"), "--checkpoint.dirpath", str(tmp_path / "ckpt"),
                 "--trainer.logger", "false", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
                 *extra])


def test_align_fit_unpadded_on(tmp_path, capsys, monkeypatch):
    """``align fit --model.step.unpadded on``: with SDPA (no varlen path) one error line naming both flags before
    any step; with ``sdpa_varlen`` the fit runs packed and says so."""
    monkeypatch.setattr(sys, "argv", ["align"])
    monkeypatch.chdir(tmp_path)
    corpus = T.make_corpus(tmp_path / "data", rows=32, rows_per_shard=16)
    assert _fit(corpus, tmp_path, "--model.step.unpadded", "on") == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("align fit: error:")]
    assert len(lines) == 1 and "--model.step.unpadded on: cannot pack: --model.encoder.attn_implementation " in \
        lines[0] and "has no variable-length path" in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "ckpt").exists()
    assert _fit(corpus, tmp_path, "--model.step.unpadded", "on", "--model.encoder.attn_implementation", KERNEL,
                "--model.encoder.attention_dropout", "0") == 0
    err = capsys.readouterr().err
    assert "[unpadded] packed path, sdpa_varlen" in err, err
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["encoder"]["attention_dropout"] == 0.0


def test_attention_dropout_is_set_before_the_attention_modules_are_built(tmp_path):
    """``--model.encoder.attention_dropout``: every attention module of the built backbone (tiny from config, a
    saved folder, its pivot tower) uses it; hidden dropout is untouched; a config without the setting and a value
    out of range are refused naming the flag."""
    from transformers import GPT2Config

    from alignment.model import DualEncoder, ModelConfig, with_attention_dropout

    def attention_p(model: DualEncoder) -> set[float]:
        return {m.dropout.p for tower in (model.backbone, model.pivot_backbone) if tower is not None
                for name, m in tower.named_modules() if name.endswith("attention.self")}

    tiny = DualEncoder.from_model_config(ModelConfig(vocab_size=50, attention_dropout=0.0))
    assert attention_p(tiny) == {0.0} and tiny.backbone.config.hidden_dropout_prob == 0.1
    assert attention_p(DualEncoder.from_model_config(ModelConfig(vocab_size=50))) == {0.1}
    folder = tmp_path / "enc"
    DualEncoder.from_config(DualEncoder.tiny_config(50), share_encoder=False).save_pretrained(folder)
    loaded = DualEncoder.from_model_config(ModelConfig(name_or_path=str(folder), share_encoder=False,
                                                       attention_dropout=0.05))
    assert loaded.pivot_backbone is not None and attention_p(loaded) == {0.05}
    assert loaded.backbone.config.attention_probs_dropout_prob == 0.05
    with pytest.raises(ValueError, match=r"--model.encoder.attention_dropout: a gpt2 config has no attention dropout"):
        with_attention_dropout(GPT2Config(), 0.0)
    with pytest.raises(ValueError, match=r"--model.encoder.attention_dropout must be in \[0, 1\) or null, got 1.5"):
        ModelConfig(vocab_size=50, attention_dropout=1.5)


def test_unpadded_flag_is_checked():
    from alignment.module import StepConfig

    with pytest.raises(ValueError, match="--model.step.unpadded must be one of auto, off, on, got 'yes'"):
        StepConfig(unpadded="yes")
