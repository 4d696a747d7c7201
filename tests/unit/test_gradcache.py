"""GradCache equivalence: same loss and parameter gradients as the uncached path.

The uncached reference encodes the same chunks *with* gradients in one graph,
starting from the same RNG seed, so both see identical dropout masks; GradCache
must reproduce them in its re-encoding pass by restoring the RNG state per chunk.
"""

from __future__ import annotations

import copy

import pytest
import torch

from alignment import distributed
from alignment.batch import Batch
from alignment.gradcache import GradCache, GradCacheConfig, graph_leaves, split_batch
from alignment.losses import LossConfig, MultiWayContrastiveLoss, drift_loss, total_loss
from alignment.model import DualEncoder
from alignment.synthetic import rows_to_batch, synthetic_rows, tiny_tokenizer

LANGUAGES = ("de", "en", "es", "fr")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(LANGUAGES)


@pytest.fixture(scope="module")
def batch(tokenizer) -> Batch:
    """8 rows, some missing languages: about 25 sentences."""
    rows = synthetic_rows(8, LANGUAGES, seed=3, missing_prob=0.3)
    return rows_to_batch(tokenizer, rows, LANGUAGES)


def build_encoder(tokenizer, dropout=0.1) -> DualEncoder:
    torch.manual_seed(0)
    config = DualEncoder.tiny_config(len(tokenizer), hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return DualEncoder.from_config(config, projection_dim=16)


def make_loss_fn(loss_module: MultiWayContrastiveLoss, reference: DualEncoder | None = None, drift_weight=0.5):
    """What the training step does: gather candidates, contrastive loss, drift term."""

    def loss_fn(emb, batch):
        cands = distributed.gather_candidates(emb, batch.row_ids, batch.lang_ids)
        out = loss_module(emb, cands, pivot_lang_id=batch.pivot_lang_id)
        if reference is not None:
            with torch.no_grad():
                ref_emb = reference(batch)
            out.update(drift_loss(emb, ref_emb, drift_weight, candidates=cands))
        return out

    return loss_fn


def uncached_step(encoder, loss_fn, batch, chunk_size, seed):
    torch.manual_seed(seed)
    emb = torch.cat([encoder(c) for c in split_batch(batch, chunk_size)])  # one graph over all chunks
    out = loss_fn(emb, batch)
    total_loss(out).backward()
    return out


def cached_step(encoder, loss_fn, batch, chunk_size, seed):
    torch.manual_seed(seed)
    return GradCache(encoder, loss_fn, chunk_size).step(batch)


def gradients(*modules):
    return {f"{i}.{n}": p.grad.clone() for i, m in enumerate(modules) for n, p in m.named_parameters()
            if p.grad is not None}


def assert_same_gradients(a, b, atol=1e-6):
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-5, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
@pytest.mark.parametrize("objective", ["multi_positive", "pairwise"])
def test_same_loss_and_gradients_as_uncached_with_dropout(tokenizer, batch, chunk_size, objective):
    base = build_encoder(tokenizer).train()
    reference = base.frozen_copy()
    cfg = LossConfig(objective=objective, learn_temperature=True, temperature=0.07, margin=0.1)
    results = []
    for step in (cached_step, uncached_step):
        encoder, loss_module = copy.deepcopy(base), MultiWayContrastiveLoss(cfg)
        out = step(encoder, make_loss_fn(loss_module, reference), batch, chunk_size, seed=7)
        results.append((out, gradients(encoder, loss_module)))
    (cached, cached_grads), (plain, plain_grads) = results
    for key in ("contrastive_loss", "drift_loss"):
        torch.testing.assert_close(cached[key], plain[key].detach(), atol=1e-6, rtol=1e-6)
    assert_same_gradients(cached_grads, plain_grads)


def test_dropout_masks_matter_so_the_equivalence_test_has_power(tokenizer, batch):
    """Guard: with other dropout masks the gradients differ far beyond the tolerance,
    so the equivalence above really depends on GradCache restoring the RNG state."""
    base = build_encoder(tokenizer).train()
    grads = []
    for seed in (7, 8):
        encoder, loss_module = copy.deepcopy(base), MultiWayContrastiveLoss()
        uncached_step(encoder, make_loss_fn(loss_module), batch, 4, seed=seed)
        grads.append(gradients(encoder))
    diff = max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0])
    assert diff > 1e-3


def test_global_rng_advances_as_one_forward_pass(tokenizer, batch):
    """After a step the RNG is where the cached (first) pass left it: the
    re-encoding pass runs in a forked RNG and does not consume random numbers twice."""
    base = build_encoder(tokenizer).train()
    cached_step(copy.deepcopy(base), make_loss_fn(MultiWayContrastiveLoss()), batch, 5, seed=11)
    after_cached = torch.get_rng_state()
    uncached_step(copy.deepcopy(base), make_loss_fn(MultiWayContrastiveLoss()), batch, 5, seed=11)
    assert torch.equal(after_cached, torch.get_rng_state())


def test_without_dropout_chunking_equals_one_full_batch_forward(tokenizer, batch):
    base = build_encoder(tokenizer, dropout=0.0)
    cached_enc, full_enc = copy.deepcopy(base), copy.deepcopy(base)
    cached = cached_step(cached_enc, make_loss_fn(MultiWayContrastiveLoss()), batch, 3, seed=0)
    out = make_loss_fn(MultiWayContrastiveLoss())(full_enc(batch), batch)  # one forward, no chunks
    total_loss(out).backward()
    torch.testing.assert_close(cached["contrastive_loss"], out["contrastive_loss"].detach(), atol=1e-6, rtol=1e-6)
    assert_same_gradients(gradients(cached_enc), gradients(full_enc), atol=1e-5)


def test_no_sync_is_used_for_all_chunks_but_the_last(tokenizer, batch):
    entered = []

    class Counter:
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *exc):
            return False

    encoder = build_encoder(tokenizer)
    GradCache(encoder, make_loss_fn(MultiWayContrastiveLoss()), 10, no_sync=Counter).step(batch)
    chunks = len(split_batch(batch, 10))
    assert chunks == 3 and len(entered) == chunks - 1


def test_split_batch_covers_every_sentence_once(batch):
    chunks = split_batch(batch, 4)
    assert [c.num_sentences for c in chunks[:-1]] == [4] * (len(chunks) - 1)
    torch.testing.assert_close(torch.cat([c.input_ids for c in chunks]), batch.input_ids)
    torch.testing.assert_close(torch.cat([c.row_ids for c in chunks]), batch.row_ids)
    assert all(c.languages == batch.languages and c.pivot_lang_id == batch.pivot_lang_id for c in chunks)


def test_config_checks():
    assert not GradCacheConfig().enabled and GradCacheConfig(chunk_size=32).enabled
    with pytest.raises(ValueError, match="--model.gradcache.chunk_size must be >= 0"):
        GradCacheConfig(chunk_size=-1)
    with pytest.raises(ValueError, match="--model.gradcache.chunk_size"):
        GradCache(lambda b: b, lambda e, b: {}, 0)


def test_graph_leaves_finds_the_loss_parameters():
    """GradCache averages these across ranks: the learnable temperature must be found."""
    loss_module = MultiWayContrastiveLoss(LossConfig(learn_temperature=True))
    emb = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1).requires_grad_(True)
    rows, langs = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 0, 1, 0, 1])
    out = loss_module(emb, distributed.gather_candidates(emb, rows, langs))
    leaves = graph_leaves(total_loss(out))
    assert any(p is loss_module.log_temperature for p in leaves) and any(p is emb for p in leaves)
    assert len(leaves) == 2


def test_empty_batch_still_runs_the_encoder_once(batch):
    """A rank with no sentence must still run forward and backward (DDP/collectives)."""
    empty = split_batch(batch, 4)[0]
    empty = type(batch)(empty.input_ids[:0], empty.attention_mask[:0], empty.row_ids[:0], empty.lang_ids[:0],
                        batch.languages, batch.pivot_lang_id, ())
    assert len(split_batch(empty, 4)) == 1
    weight = torch.nn.Parameter(torch.ones(3))
    calls = []

    def encode(b):
        calls.append(b.num_sentences)
        return (weight * torch.ones(b.num_sentences, 3)).sum(-1, keepdim=True).expand(-1, 2)  # (0, 2)

    GradCache(encode, lambda e, b: {"x_loss": e.sum()}, 4).step(empty)
    assert calls == [0, 0] and weight.grad is not None and float(weight.grad.abs().sum()) == 0.0
