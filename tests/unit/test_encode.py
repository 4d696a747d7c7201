"""Length-grouped encoding (``alignment/encode.py``): the maths of the step does not change.

In float64 and eval mode, embeddings and parameter gradients of the grouped path equal the single
padded forward's, for the plain step, the GradCache step and the drift reference (the world-2 case is
in ``tests/distributed/test_module_ddp.py``); the chunk plan keeps the budget, takes every sentence
once and puts them back in batch order; a left-padded batch is encoded in one padded forward.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from alignment.encode import PaddingStats, encode_grouped, plan_chunks
from alignment.losses import total_loss
from alignment.synthetic import rows_to_batch, synthetic_rows, tiny_tokenizer
from tests import _training as T

BUDGET = 24  # tokens per chunk: several chunks on the test batch, the longest sentences one per chunk


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def batch(tokenizer):
    """10 rows of up to 4 languages, sentence lengths varying several-fold (right padding)."""
    rows = synthetic_rows(10, T.LANGUAGES, seed=11, missing_prob=0.3, min_words=1, max_words=14)
    return rows_to_batch(tokenizer, list(rows), T.LANGUAGES)


def build(tokenizer, budget, **kwargs):
    module = T.module(T.Corpus(Path("."), Path("."), len(tokenizer)), seed=3, step={"token_budget": budget},
                      **kwargs).double().eval()
    if module._reference is not None:
        module._reference.double()
    return module


def test_chunk_plan_keeps_the_budget_and_takes_every_sentence_once():
    lengths = [3, 17, 5, 5, 60, 2, 9, 11, 1, 5, 8, 40]
    order, chunks = plan_chunks(lengths, token_budget=40)
    assert sorted(order) == list(range(len(lengths)))  # every sentence once
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    assert order.index(2) < order.index(3) < order.index(9)  # stable among equal lengths
    covered = []
    for start, stop, width in chunks:
        members = order[start:stop]
        covered += members
        assert width == max(lengths[i] for i in members)  # padded to its own longest sentence
        assert len(members) * width <= 40 or len(members) == 1  # the budget, or a long sentence alone
    assert covered == order
    long_chunk = next(c for c in chunks if order[c[0]] == 4)
    assert long_chunk[1] - long_chunk[0] == 1 and long_chunk[2] == 60  # 60 > 40: alone
    assert plan_chunks(lengths, 40) == (order, chunks)  # deterministic (GradCache re-encodes the same chunks)
    # the forward cost trades padding against forwards: free forwards give no padding at all, costly ones
    # the fewest chunks the budget allows
    _, free = plan_chunks(lengths, 40, forward_cost=0)
    assert sum((b - a) * w for a, b, w in free) == sum(lengths)
    _, few = plan_chunks(lengths, 40, forward_cost=10**6)
    assert len(few) <= len(chunks) <= len(free)
    assert [(b - a) * w for a, b, w in few if b - a > 1] and all((b - a) * w <= 40 or b - a == 1 for a, b, w in few)
    with pytest.raises(ValueError, match="--model.step.token_budget"):
        plan_chunks(lengths, 0)


def test_grouped_embeddings_and_gradients_equal_the_padded_forward(tokenizer, batch):
    lengths = batch.attention_mask.sum(1)
    assert int(lengths.max()) * 2 > BUDGET and int(lengths.max()) > 3 * int(lengths.min())  # really grouped
    padded, grouped = build(tokenizer, None), build(tokenizer, BUDGET)
    calls = []
    forward = grouped.encoder.forward
    grouped.encoder.forward = lambda b, **kw: calls.append(tuple(b.input_ids.shape)) or forward(b, **kw)
    stats = PaddingStats()
    grouped._padding = stats
    emb_p, emb_g = padded._encode(batch), grouped._encode(batch)
    assert len(calls) > 2 and all(n * width <= BUDGET or n == 1 for n, width in calls)
    assert sum(n for n, _ in calls) == batch.num_sentences
    torch.testing.assert_close(emb_g, emb_p, rtol=1e-12, atol=1e-12)  # in batch order
    # the padding share counts what the backbone processed: less than the padded batch's
    assert stats.processed == sum(n * w for n, w in calls)
    assert float(stats.share()) < batch.padding_ratio
    total_loss(padded._loss_terms(emb_p, batch)).backward()
    total_loss(grouped._loss_terms(emb_g, batch)).backward()
    T.assert_same_grads(T.grads(grouped), T.grads(padded))


def test_grouped_drift_reference_equals_the_padded_forward(tokenizer, batch):
    loss = {"objective": "multi_positive", "drift_weight": 0.5}
    padded, grouped = build(tokenizer, None, loss=loss), build(tokenizer, BUDGET, loss=loss)
    with torch.no_grad():  # move the weights off the reference, so drift is not zero
        for module in (padded, grouped):
            for p in module.encoder.parameters():
                p.add_(0.01 * torch.sin(torch.arange(p.numel(), dtype=p.dtype)).reshape(p.shape))
    out_p = padded._loss_terms(padded._encode(batch), batch)
    out_g = grouped._loss_terms(grouped._encode(batch), batch)
    drift = [k for k in out_p if "drift" in k]
    assert drift and float(out_p[drift[0]].detach()) > 0
    for key in drift:
        torch.testing.assert_close(out_g[key], out_p[key], rtol=1e-12, atol=1e-14)
    total_loss(out_p).backward()
    total_loss(out_g).backward()
    T.assert_same_grads(T.grads(grouped), T.grads(padded))


def test_grouped_gradcache_equals_the_padded_forward(tokenizer, batch):
    kwargs = dict(loss={"objective": "multi_positive", "learn_temperature": True}, gradcache={"chunk_size": 7})
    padded, grouped = build(tokenizer, None, **kwargs), build(tokenizer, BUDGET, **kwargs)
    plain = build(tokenizer, None, loss=kwargs["loss"])  # no GradCache, one padded forward
    chunks, inverse = grouped._gradcache.chunks(batch)
    assert inverse is not None and len(chunks) == 5
    widths = [c.input_ids.shape[1] for c in chunks]
    assert widths == sorted(widths, reverse=True) and widths[-1] < batch.input_ids.shape[1]
    seen = []
    forward = grouped.encoder.forward
    grouped.encoder.forward = lambda b, **kw: seen.append(b.input_ids.clone()) or forward(b, **kw)
    out_g, out_p = grouped._gradcache.step(batch), padded._gradcache.step(batch)
    half = len(seen) // 2
    assert len(seen) == 2 * half and all(torch.equal(a, b) for a, b in zip(seen[:half], seen[half:]))  # same chunks
    total_loss(plain._loss_terms(plain._encode(batch), batch)).backward()
    torch.testing.assert_close(out_g["contrastive_loss"], out_p["contrastive_loss"], rtol=1e-12, atol=1e-12)
    T.assert_same_grads(T.grads(grouped), T.grads(padded))
    T.assert_same_grads(T.grads(grouped), T.grads(plain))


def left_padded(batch):
    """The same sentences, padded on the left (as a decoder tokenizer would)."""
    mask = batch.attention_mask
    lengths = mask.sum(1)
    width = mask.shape[1]
    ids = torch.zeros_like(batch.input_ids)
    new_mask = torch.zeros_like(mask)
    for i, n in enumerate(lengths.tolist()):
        ids[i, width - n:] = batch.input_ids[i, :n]
        new_mask[i, width - n:] = 1
    return replace(batch, input_ids=ids, attention_mask=new_mask)


def test_left_padding_is_encoded_in_one_padded_forward(tokenizer, batch):
    """Cutting pad columns on the left would shift BERT's absolute positions: the grouped path falls back."""
    left = left_padded(batch)
    module = build(tokenizer, BUDGET)
    calls = []
    forward = module.encoder.forward
    module.encoder.forward = lambda b, **kw: calls.append(tuple(b.input_ids.shape)) or forward(b, **kw)
    stats = PaddingStats()
    emb = encode_grouped(module.encoder, left, BUDGET, stats)
    assert calls == [tuple(left.input_ids.shape)]
    torch.testing.assert_close(emb, forward(left), rtol=0, atol=0)
    assert float(stats.share()) == pytest.approx(left.padding_ratio)
    chunks, inverse = build(tokenizer, BUDGET, gradcache={"chunk_size": 7})._gradcache.chunks(left)
    assert inverse is None and all(c.input_ids.shape[1] == left.input_ids.shape[1] for c in chunks)


def test_token_budget_flag_is_checked():
    from alignment.module import StepConfig

    with pytest.raises(ValueError, match="--model.step.token_budget must be >= 0"):
        StepConfig(token_budget=-1)
    assert StepConfig(token_budget=0).token_budget == 0


def test_fit_logs_the_padding_share_of_its_forwards(tmp_path):
    """``train/padding_share`` on logging steps: the share of the processed token positions that are padding,
    lower with length grouping than with the one padded forward, from the same fused log (no extra collective)."""
    from lightning.pytorch.loggers import CSVLogger

    corpus = T.make_corpus(tmp_path / "data", rows=80, rows_per_shard=20)
    shares = {}
    for budget in (0, 32):
        root = tmp_path / f"budget{budget}"
        dm = T.datamodule(corpus, languages=list(T.LANGUAGES), batch_size=20, shuffle_buffer=0)
        trainer = T.trainer(root, max_steps=2, logger=[CSVLogger(str(root), name="csv")], log_every_n_steps=1)
        trainer.fit(T.module(corpus, step={"token_budget": budget}), datamodule=dm)
        rows = [r for r in T.csv_metrics(root / "csv" / "version_0" / "metrics.csv") if "train/padding_share" in r]
        assert [int(r["step"]) for r in rows] == [0, 1]
        shares[budget] = [r["train/padding_share"] for r in rows]
    assert all(0 < s < 1 for s in shares[0])
    assert all(0 <= g < p for g, p in zip(shares[32], shares[0])), shares


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
def test_one_word_embedding_lookup_per_step_gives_the_same_gradients(tokenizer, batch, arch):
    """The grouped path looks the batch's word embeddings up once (``DualEncoder.token_embeddings``): the
    table's dense gradient is built once per step, not once per chunk; the numbers are the padded forward's
    (XLM-R numbers positions from the ids on that path, from the embeddings on this one: equal on real tokens)."""
    from transformers import XLMRobertaConfig

    from alignment.model import DualEncoder

    small = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, pad_token_id=0)
    config = DualEncoder.tiny_config(len(tokenizer)) if arch == "bert" else XLMRobertaConfig(
        max_position_embeddings=130, **small)
    torch.manual_seed(0)
    padded = DualEncoder.from_config(config).double().eval()
    grouped = DualEncoder.from_config(config).double().eval()
    grouped.load_state_dict(padded.state_dict())
    lookups = []
    table = grouped.backbone.get_input_embeddings()
    table.register_forward_hook(lambda *_: lookups.append(1))
    emb_p, emb_g = padded(batch), encode_grouped(grouped, batch, BUDGET)
    assert len(lookups) == 1  # one lookup for all chunks
    torch.testing.assert_close(emb_g, emb_p, rtol=1e-12, atol=1e-12)
    weights = torch.linspace(-1, 1, emb_p.numel(), dtype=emb_p.dtype).reshape(emb_p.shape)
    (emb_p * weights).sum().backward()
    (emb_g * weights).sum().backward()
    T.assert_same_grads({n: p.grad for n, p in grouped.named_parameters() if p.grad is not None},
                {n: p.grad for n, p in padded.named_parameters() if p.grad is not None})


def test_forward_cost_follows_the_measured_points():
    """The plan's per-forward charge is a deterministic function of the encoder's width (benchmarks/forward_cost.py)."""
    from types import SimpleNamespace

    from alignment.encode import FORWARD_COST, MEASURED_FORWARD_COST, forward_cost_for

    def of(hidden):
        return forward_cost_for(SimpleNamespace(backbone=SimpleNamespace(config=SimpleNamespace(hidden_size=hidden))))

    (h0, c0), (h1, c1) = MEASURED_FORWARD_COST[0], MEASURED_FORWARD_COST[-1]
    assert of(h0) == c0 and of(h1) == c1 and of(8) == c0 and of(4096) == c1
    assert c1 < of(128) < c0  # interpolated between the points
    assert forward_cost_for(object()) == FORWARD_COST  # no config: the fixed default
