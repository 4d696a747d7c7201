"""Duplicate-text masking across ranks (gloo, world 2, CPU): the gathered text identities give every rank the
masks one process would build over the concatenated global batch.

Rank 0 holds rows 0, 2, 4, 6 and rank 1 rows 1, 3, 5, 7 of ``tests/unit/test_negatives.SENTENCES``: every
duplicate pair ("Save"/"save!", "Annuler", "OK"/"ok", "SAVE"/"save!") straddles the ranks, and the local batches
have unequal sizes (the padding path). Checked against the single-process loss over the global batch:

- embedding level (a linear head under DDP), every masking mode: loss (mean over ranks), DDP-averaged parameter
  gradients and ``masked_negatives`` (mean over ranks = the global count);
- the module's own step through GradCache (``_loss_terms`` + ``average_gradients_``, what ``_gradcache_step``
  runs), with its learnable temperature;
- ranks disagreeing on whether they give text ids raise the same ValueError on every rank (no gloo abort).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _spawn import run_world
from torch import nn

from alignment import distributed
from alignment.distributed import gather_candidates
from alignment.gradcache import GradCache
from alignment.losses import LossConfig, MultiWayContrastiveLoss, total_loss
from tests.unit.test_negatives import SENTENCES, candidates, make_batch, make_module

pytestmark = pytest.mark.distributed

RANK_ROWS = ([0, 2, 4, 6], [1, 3, 5, 7])
MODES = ("rows", "texts", "off")
FEAT = 6


def features(batch) -> torch.Tensor:
    """Deterministic per-sentence features, the same whichever rank holds the sentence."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(len(SENTENCES), FEAT, generator=g, dtype=torch.float64)
    index = {(str(r), lang): i for i, (r, lang, _) in enumerate(SENTENCES)}
    keys = [batch.row_keys[r] for r in batch.row_ids.tolist()]
    return table[[index[(k, lang)] for k, lang in zip(keys, batch.lang_ids.tolist())]]


class Head(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(FEAT, 8, dtype=torch.float64)
        self.loss = MultiWayContrastiveLoss(LossConfig(mask_duplicates=mode, learn_temperature=True)).double()

    def forward(self, x, batch, single=False):
        emb = F.normalize(self.proj(x), dim=-1)
        if single:
            cands = candidates(emb, batch.row_ids, batch.lang_ids, batch.text_ids)
        else:
            cands = gather_candidates(emb, batch.row_ids, batch.lang_ids, text_ids=batch.text_ids)
        return self.loss(emb, cands)


def grads_of(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def embedding_case(rank, mode):
    from torch.nn.parallel import DistributedDataParallel as DDP

    head = Head(mode)
    batch = make_batch(RANK_ROWS[rank])
    ddp = DDP(head)  # kept alive: its reducer averages the gradients during backward
    out = ddp(features(batch), batch)
    out["contrastive_loss"].backward()
    return {"loss": out["contrastive_loss"].item(), "masked": out["masked_negatives"].item(), "grads": grads_of(head)}


def gradcache_case(rank):
    module = make_module("rows")
    batch = make_batch(RANK_ROWS[rank])
    out = GradCache(module._encode, module._loss_terms, 4).step(batch)
    distributed.average_gradients_([p for p in module.encoder.parameters() if p.requires_grad])
    return {"loss": out["contrastive_loss"].item(), "masked": out["masked_negatives"].item(),
            "grads": grads_of(module)}


def mismatch_case(rank):
    batch = make_batch(RANK_ROWS[rank])
    emb = torch.randn(batch.num_sentences, 4)
    try:
        gather_candidates(emb, batch.row_ids, batch.lang_ids, text_ids=batch.text_ids if rank == 0 else None)
    except ValueError as exc:
        return str(exc)
    return None


def worker(rank: int, world: int, out_dir: str) -> None:
    results = {mode: embedding_case(rank, mode) for mode in MODES}
    results["gradcache"] = gradcache_case(rank)
    results["mismatch"] = mismatch_case(rank)
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("world2")
    run_world(worker, 2, str(out_dir), timeout=120, preload=(__name__, "transformers.models.bert.modeling_bert"))
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


def global_batch():
    return make_batch([*RANK_ROWS[0], *RANK_ROWS[1]])


def assert_equivalent(ranks, key, ref):
    assert sum(r[key]["loss"] for r in ranks) / 2 == pytest.approx(ref["loss"], rel=1e-10)
    assert sum(r[key]["masked"] for r in ranks) / 2 == ref["masked"]
    for r in ranks:
        assert r[key]["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(r[key]["grads"][name], grad, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_masked_loss_across_ranks_equals_one_process(ranks, mode):
    head, batch = Head(mode), global_batch()
    out = head(features(batch), batch, single=True)
    out["contrastive_loss"].backward()
    ref = {"loss": out["contrastive_loss"].item(), "masked": out["masked_negatives"].item(), "grads": grads_of(head)}
    assert (ref["masked"] > 0) == (mode != "off")
    assert_equivalent(ranks, mode, ref)
    if mode == "rows":  # the masking has teeth: without it the global loss differs
        assert ranks[0]["off"]["loss"] + ranks[1]["off"]["loss"] != pytest.approx(2 * ref["loss"], rel=1e-6)


def test_gradcache_module_step_across_ranks_equals_one_process(ranks):
    module, batch = make_module("rows"), global_batch()
    out = module._loss_terms(module._encode(batch), batch)
    total_loss(out).backward()
    ref = {"loss": out["contrastive_loss"].item(), "masked": out["masked_negatives"].item(), "grads": grads_of(module)}
    assert ref["masked"] > 0 and "loss_fn.log_temperature" in ref["grads"]
    assert_equivalent(ranks, "gradcache", ref)


def test_ranks_disagreeing_on_text_ids_raise_everywhere(ranks):
    assert all("text_ids" in r["mismatch"] for r in ranks)
