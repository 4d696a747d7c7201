"""Exact cross-device negatives on real gloo process groups (world size 2 and 4, CPU).

Every rank encodes its local batch, gathers candidates with
``alignment.distributed.gather_candidates``, computes the loss of its local
anchors, back-propagates through a real ``DistributedDataParallel`` (which
averages gradients over ranks, as a training run does). The test process then
computes the *same* loss in one process over the concatenated global batch and
requires, to 1e-5:

- DDP-averaged parameter gradients (every rank) == single-process gradients;
- each rank's input gradient / world == the single-process input gradient of
  its rows (inputs are not averaged by DDP: the exact gather makes them the
  gradient of the sum of all ranks' losses);
- the mean over ranks of the returned losses == the single-process loss.

for every loss variant, with unequal local batch sizes (the pad-and-mask path),
equal ones and a rank with no sentence at all, and for GradCache with a
DDP-wrapped tiny encoder (dropout on).
Controls show the comparison has teeth: gathered blocks in the wrong order,
global row ids missing their rank offset, and a plain ``dist.all_gather`` with
the local tensor put back in its slot must all *fail* it.

One spawn per world size runs every case (spawning costs seconds on 2 cores);
each test then checks one case of the stored results.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from _spawn import run_world
from torch import nn

from alignment.batch import Batch
from alignment.distributed import gather_candidates
from alignment.gradcache import GradCache, split_batch
from alignment.losses import GlobalCandidates, LossConfig, MultiWayContrastiveLoss, drift_loss, total_loss
from alignment.model import DualEncoder
from alignment.synthetic import rows_to_batch, synthetic_rows, tiny_tokenizer

pytestmark = pytest.mark.distributed

WORLD_SIZES = (2, 4)
FEAT, DIM, NUM_LANGS, PIVOT = 12, 8, 4, 0
TOL = 1e-5
LOSS_VARIANTS = {
    "multi_positive": dict(objective="multi_positive", learn_temperature=True),
    "multi_positive_margin": dict(objective="multi_positive", margin=0.3),
    "pairwise": dict(objective="pairwise", learn_temperature=True),
    "pairwise_margin_one_direction": dict(objective="pairwise", margin=0.3, bidirectional=False),
    "en_x": dict(objective="en_x", learn_temperature=True),
    "en_x_margin": dict(objective="en_x", margin=0.3),
}
GRADCACHE_CHUNKS = (3, 8)
LANGUAGES = ("de", "en", "es", "fr")


# --------------------------------------------------------------------------- data, same in every process


def rank_layout(world: int, kind: str) -> list[list[list[int]]]:
    """Per rank, its rows as lists of language ids.

    ``unequal``: ranks hold 2, 3, ... rows with random subsets of languages, so
    local sizes differ, some rows lack the pivot and some have one sentence.
    ``equal``: 3 complete rows per rank. ``empty``: as unequal, but the last
    rank has no sentence at all (it must still join every collective).
    """
    rng = random.Random(1000 * world + len(kind))
    layout = []
    for rank in range(world):
        if kind == "equal":
            layout.append([list(range(NUM_LANGS))] * 3)
        elif kind == "empty" and rank == world - 1:
            layout.append([])
        else:
            layout.append([sorted(rng.sample(range(NUM_LANGS), rng.randint(1, NUM_LANGS))) for _ in range(2 + rank)])
    return layout


def rank_inputs(world: int, kind: str, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s features (n, FEAT) float64, batch-local row ids, language ids."""
    rows = rank_layout(world, kind)[rank]
    row_ids = torch.tensor([r for r, langs in enumerate(rows) for _ in langs], dtype=torch.long)
    lang_ids = torch.tensor([lang for langs in rows for lang in langs], dtype=torch.long)
    g = torch.Generator().manual_seed(10_000 * world + 100 * len(kind) + rank)
    return torch.randn(len(row_ids), FEAT, generator=g, dtype=torch.float64), row_ids, lang_ids


def global_inputs(world: int, kind: str):
    """The concatenated global batch, rows made global by the rank offsets."""
    xs, rows, langs, offset = [], [], [], 0
    for rank in range(world):
        x, r, lg = rank_inputs(world, kind, rank)
        xs.append(x)
        rows.append(r + offset)
        langs.append(lg)
        offset += len(rank_layout(world, kind)[rank])
    return torch.cat(xs), torch.cat(rows), torch.cat(langs)


class Head(nn.Module):
    """A linear "encoder" plus the loss: what the LightningModule wraps in DDP."""

    def __init__(self, loss_cfg: LossConfig):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(FEAT, DIM, dtype=torch.float64)
        self.loss = MultiWayContrastiveLoss(loss_cfg).double()

    def forward(self, x, row_ids, lang_ids, gather=gather_candidates):
        emb = F.normalize(self.proj(x), dim=-1)  # (n, DIM)
        return self.loss(emb, gather(emb, row_ids, lang_ids), pivot_lang_id=PIVOT)


def make_batch(tokenizer, rows) -> Batch:
    return rows_to_batch(tokenizer, rows, LANGUAGES)


def rank_batch(tokenizer, world: int, rank: int) -> Batch:
    """2 or 3 rows, languages missing at random: unequal sizes and lengths."""
    return make_batch(tokenizer, synthetic_rows(2 + rank % 2, LANGUAGES, seed=100 * world + rank, missing_prob=0.4))


def build_encoder(tokenizer) -> DualEncoder:
    torch.manual_seed(0)
    config = DualEncoder.tiny_config(len(tokenizer), hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return DualEncoder.from_config(config, projection_dim=16).double()


def gradcache_loss_module() -> MultiWayContrastiveLoss:
    return MultiWayContrastiveLoss(LossConfig(objective="multi_positive", learn_temperature=True, margin=0.1)).double()


def gradcache_loss_fn(loss_module, reference):
    def loss_fn(emb, batch):
        cands = gather_candidates(emb, batch.row_ids, batch.lang_ids)
        out = loss_module(emb, cands, pivot_lang_id=batch.pivot_lang_id)
        with torch.no_grad():
            ref_emb = reference(batch)
        out.update(drift_loss(emb, ref_emb, 0.5, candidates=cands))
        return out

    return loss_fn


def grads_of(*modules) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.grad.detach().clone() for i, m in enumerate(modules) for n, p in m.named_parameters()
            if p.grad is not None}


# --------------------------------------------------------------------------- rank side


def roll_rank_blocks(cands: GlobalCandidates) -> GlobalCandidates:
    """BUG on purpose: gathered embedding blocks one rank off from their ids."""
    world = cands.world_size
    cands.emb = cands.emb.view(world, -1, cands.emb.shape[1]).roll(1, dims=0).reshape(-1, cands.emb.shape[1])
    return cands


def drop_row_offsets(cands: GlobalCandidates) -> GlobalCandidates:
    """BUG on purpose: local row ids used as global ones (labels not offset by rank)."""
    world = cands.world_size
    blocks = cands.row_ids.view(world, -1)
    local = blocks - torch.where(blocks >= 0, blocks.clamp(min=0).min(dim=1, keepdim=True).values, 0)
    cands.row_ids = torch.where(blocks >= 0, local, -1).reshape(-1)
    return cands


def naive_all_gather(emb, row_ids, lang_ids):
    """BUG on purpose: plain all_gather (no gradient) with the local tensor put back in its slot."""
    import torch.distributed as dist

    cands = gather_candidates(emb.detach(), row_ids, lang_ids)  # ids; equal sizes so no padding
    blocks = list(cands.emb.chunk(cands.world_size))
    blocks[dist.get_rank()] = emb
    cands.emb = torch.cat(blocks)
    return cands


def embedding_case(rank, world, loss_cfg, *, kind="unequal", gather=gather_candidates):
    from torch.nn.parallel import DistributedDataParallel as DDP

    head = Head(loss_cfg)
    model = DDP(head)  # averages parameter gradients over ranks, as a training run does
    x, row_ids, lang_ids = rank_inputs(world, kind, rank)
    x.requires_grad_(True)
    out = model(x, row_ids, lang_ids, gather=gather)
    out["contrastive_loss"].backward()
    return {"loss": out["contrastive_loss"].item(), "grads": grads_of(head), "x_grad": x.grad.clone()}


def width_mismatch_case(rank, world):
    """Ranks disagree on the embedding width: a ValueError on every rank, no hang, no abort."""
    emb = torch.randn(3, 8 + rank)
    try:
        gather_candidates(emb, torch.zeros(3, dtype=torch.long), torch.arange(3))
    except ValueError as exc:
        return str(exc)
    return None


def gradcache_case(rank, world, chunk):
    from torch.nn.parallel import DistributedDataParallel as DDP

    tokenizer = tiny_tokenizer(LANGUAGES)
    encoder = build_encoder(tokenizer).train()
    reference = encoder.frozen_copy()
    loss_module = gradcache_loss_module()
    # forward_sync_buffers=False: ranks run different numbers of chunks (forwards),
    # and each DDP forward would otherwise broadcast buffers (a collective).
    ddp = DDP(encoder, forward_sync_buffers=False)
    cache = GradCache(ddp, gradcache_loss_fn(loss_module, reference), chunk, no_sync=ddp.no_sync)
    torch.manual_seed(1000 + rank)  # each rank its own dropout masks
    out = cache.step(rank_batch(tokenizer, world, rank))
    return {"loss": {k: v.item() for k, v in out.items()}, "grads": grads_of(encoder, loss_module)}


def worker(rank: int, world: int, out_dir: str) -> None:
    results = {name: embedding_case(rank, world, LossConfig(**cfg)) for name, cfg in LOSS_VARIANTS.items()}
    equal_cfg = LossConfig(objective="multi_positive", learn_temperature=True)
    results["equal_sizes"] = embedding_case(rank, world, equal_cfg, kind="equal")
    results["empty_rank"] = embedding_case(rank, world, equal_cfg, kind="empty")
    results["bug_rolled_blocks"] = embedding_case(
        rank, world, equal_cfg, kind="equal", gather=lambda *a: roll_rank_blocks(gather_candidates(*a)))
    results["bug_no_row_offset"] = embedding_case(
        rank, world, equal_cfg, kind="equal", gather=lambda *a: drop_row_offsets(gather_candidates(*a)))
    results["bug_plain_all_gather"] = embedding_case(rank, world, equal_cfg, kind="equal", gather=naive_all_gather)
    results["width_mismatch"] = width_mismatch_case(rank, world)
    for chunk in GRADCACHE_CHUNKS:
        results[f"gradcache_{chunk}"] = gradcache_case(rank, world, chunk)
    torch.save(results, f"{out_dir}/rank{rank}.pt")


# --------------------------------------------------------------------------- single-process references


def single_process_embedding(world, loss_cfg, kind="unequal"):
    head = Head(loss_cfg)
    x, rows, langs = global_inputs(world, kind)
    x.requires_grad_(True)
    emb = F.normalize(head.proj(x), dim=-1)  # (N_global, DIM)
    out = head.loss(emb, GlobalCandidates.single(emb, rows, langs), pivot_lang_id=PIVOT)
    out["contrastive_loss"].backward()
    return {"loss": out["contrastive_loss"].item(), "grads": grads_of(head), "x_grad": x.grad}


def single_process_gradcache(world, chunk):
    """Same computation in one process: each rank's chunks encoded under that
    rank's seed (so dropout masks match), then one loss over the global batch."""
    tokenizer = tiny_tokenizer(LANGUAGES)
    encoder = build_encoder(tokenizer).train()
    reference = encoder.frozen_copy()
    loss_module = gradcache_loss_module()
    embs, refs, rows, langs, offset = [], [], [], [], 0
    for rank in range(world):
        batch = rank_batch(tokenizer, world, rank)
        torch.manual_seed(1000 + rank)
        embs.append(torch.cat([encoder(c) for c in split_batch(batch, chunk)]))  # (n_r, D) with grad
        with torch.no_grad():
            refs.append(reference(batch))
        rows.append(batch.row_ids + offset)
        langs.append(batch.lang_ids)
        offset += batch.num_rows
    emb = torch.cat(embs)  # (N_global, D)
    cands = GlobalCandidates.single(emb, torch.cat(rows), torch.cat(langs))
    out = loss_module(emb, cands, pivot_lang_id=LANGUAGES.index("en"))
    out.update(drift_loss(emb, torch.cat(refs), 0.5, candidates=cands))
    total_loss(out).backward()
    return {"loss": {k: v.item() for k, v in out.items()}, "grads": grads_of(encoder, loss_module)}


def max_errors(ranks: list[dict], ref: dict, world: int) -> dict[str, float]:
    """Largest deviation from the single-process reference, per quantity."""
    errors = {"loss": abs(sum(r["loss"] for r in ranks) / world - ref["loss"])}
    errors["param_grad"] = max((r["grads"][k] - g).abs().max().item() for r in ranks for k, g in ref["grads"].items())
    assert all(r["grads"].keys() == ref["grads"].keys() for r in ranks)
    x_ref = ref["x_grad"].split([r["x_grad"].shape[0] for r in ranks])
    errors["input_grad"] = max((r["x_grad"] / world - g).abs().max().item() for r, g in zip(ranks, x_ref)
                               if g.numel())
    return errors


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def world_results(request, tmp_path_factory):
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"world{world}")
    run_world(worker, world, str(out_dir), timeout=120, preload=(__name__, "transformers.models.bert.modeling_bert"))
    return world, [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("variant", list(LOSS_VARIANTS))
def test_gathered_gradients_equal_single_process_unequal_sizes(world_results, variant):
    world, results = world_results
    ranks = [r[variant] for r in results]
    assert len({r["x_grad"].shape[0] for r in ranks}) > 1, "local sizes should differ (pad-and-mask path)"
    errors = max_errors(ranks, single_process_embedding(world, LossConfig(**LOSS_VARIANTS[variant])), world)
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("kind", ["equal", "empty"])
def test_gathered_gradients_equal_single_process_equal_sizes_and_empty_rank(world_results, kind):
    """Equal sizes (no padding at all), and a rank without any sentence (all padding)."""
    world, results = world_results
    cfg = LossConfig(objective="multi_positive", learn_temperature=True)
    ranks = [r["equal_sizes" if kind == "equal" else "empty_rank"] for r in results]
    if kind == "empty":
        assert ranks[-1]["x_grad"].shape[0] == 0
    errors = max_errors(ranks, single_process_embedding(world, cfg, kind=kind), world)
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("bug", ["bug_rolled_blocks", "bug_no_row_offset"])
def test_mixing_up_gathered_columns_fails_the_equivalence(world_results, bug):
    """Pins the known failure mode: a row's translations landing in the wrong
    columns (blocks out of rank order, or row ids without their rank offset)
    must be caught by the comparison above."""
    world, results = world_results
    cfg = LossConfig(objective="multi_positive", learn_temperature=True)
    errors = max_errors([r[bug] for r in results], single_process_embedding(world, cfg, kind="equal"), world)
    assert errors["param_grad"] > 1e-3 and errors["loss"] > 1e-3, errors


def test_plain_all_gather_gives_wrong_gradients(world_results):
    """The measured pitfall: a plain all_gather with the local slot re-inserted
    drops the gradient other ranks' losses send to this rank's embeddings."""
    world, results = world_results
    cfg = LossConfig(objective="multi_positive", learn_temperature=True)
    errors = max_errors([r["bug_plain_all_gather"] for r in results],
                        single_process_embedding(world, cfg, kind="equal"), world)
    assert errors["loss"] < TOL  # the forward is right...
    assert errors["param_grad"] > 1e-3, errors  # ...the gradient is not


def test_width_mismatch_raises_on_every_rank(world_results):
    world, results = world_results
    messages = [r["width_mismatch"] for r in results]
    assert all(m is not None and "rank 1 has embedding width 9 but rank 0 has 8" in m for m in messages), messages


@pytest.mark.parametrize("chunk", GRADCACHE_CHUNKS)
def test_gradcache_with_ddp_equals_single_process(world_results, chunk):
    world, results = world_results
    ranks = [r[f"gradcache_{chunk}"] for r in results]
    ref = single_process_gradcache(world, chunk)
    for key in ("contrastive_loss", "drift_loss"):
        assert abs(sum(r["loss"][key] for r in ranks) / world - ref["loss"][key]) < TOL
    assert all(r["grads"].keys() == ref["grads"].keys() for r in ranks) and len(ref["grads"]) > 10
    err = max((r["grads"][k] - g).abs().max().item() for r in ranks for k, g in ref["grads"].items())
    assert err < TOL, err
