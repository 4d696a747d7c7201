"""Margin-based bitext mining: planted pairs, LASER's modes against a loop reference, determinism, memory, FAISS."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from alignment.evaluate.embeddings import InvalidEmbeddingsError
from alignment.evaluate.mining import MINING_MODES, MiningConfig, mine
from alignment.evaluate.search import knn, resolve_backend


def planted(seed: int = 0, dim: int = 64, pairs: int = 60, nx: int = 200, ny: int = 240):
    """Sources and targets of random distractors with ``pairs`` noisy translations planted at random positions."""
    g = torch.Generator().manual_seed(seed)
    src, tgt = torch.randn(nx, dim, generator=g), torch.randn(ny, dim, generator=g)
    xs, ys = torch.randperm(nx, generator=g)[:pairs], torch.randperm(ny, generator=g)[:pairs]
    tgt[ys] = F.normalize(src[xs], dim=1) + 0.3 * torch.randn(pairs, dim, generator=g) / dim**0.5
    return src, tgt, set(zip(xs.tolist(), ys.tolist()))


@pytest.mark.parametrize("mode", ["max-score", "intersection"])
def test_recovers_planted_pairs_among_distractors(mode):
    src, tgt, gold = planted()
    mined = mine(src, tgt, MiningConfig(mode=mode, threshold=1.65))
    assert {(s, t) for s, t, _ in mined.as_list()} == gold
    below = mine(src, tgt, MiningConfig(mode=mode, threshold=0.0))
    assert len(below) > len(gold)  # distractors do get matched when the threshold is dropped


def _reference_mine(
    x: torch.Tensor, y: torch.Tensor, k: int, mode: str, threshold: float
) -> list[tuple[int, int, float]]:
    """LASER mine_bitexts.py with loops over a full cosine matrix (ratio margin)."""
    x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    cos = (x @ y.T).tolist()
    nx, ny = len(cos), len(cos[0])
    fwd_mean = [sum(sorted(cos[i], reverse=True)[:k]) / k for i in range(nx)]
    bwd_mean = [sum(sorted((cos[i][j] for i in range(nx)), reverse=True)[:k]) / k for j in range(ny)]
    margin = lambda i, j: cos[i][j] / ((fwd_mean[i] + bwd_mean[j]) / 2)  # noqa: E731
    fwd = [max(sorted(range(ny), key=lambda j: -cos[i][j])[:k], key=lambda j: margin(i, j)) for i in range(nx)]
    bwd = [max(sorted(range(nx), key=lambda i: -cos[i][j])[:k], key=lambda i: margin(i, j)) for j in range(ny)]
    if mode == "forward":
        pairs = [(i, fwd[i]) for i in range(nx)]
    elif mode == "backward":
        pairs = [(bwd[j], j) for j in range(ny)]
    elif mode == "intersection":
        pairs = [(i, fwd[i]) for i in range(nx) if bwd[fwd[i]] == i]
    else:  # max-score: union, greedy by score, one-to-one
        candidates = sorted(
            {(i, fwd[i]) for i in range(nx)} | {(bwd[j], j) for j in range(ny)}, key=lambda p: (-margin(*p), p)
        )
        pairs, used_s, used_t = [], set(), set()
        for i, j in candidates:
            if i not in used_s and j not in used_t:
                used_s.add(i)
                used_t.add(j)
                pairs.append((i, j))
    scored = [(i, j, margin(i, j)) for i, j in pairs if margin(i, j) >= threshold]
    return sorted(scored, key=lambda p: (-p[2], p[0], p[1]))


@pytest.mark.parametrize("mode", MINING_MODES)
def test_modes_match_loop_reference(mode):
    src, tgt, _ = planted(seed=1, dim=8, pairs=12, nx=30, ny=25)
    got = mine(src, tgt, MiningConfig(mode=mode, k=3, threshold=1.0, chunk_size=4)).as_list()
    expected = _reference_mine(src, tgt, 3, mode, 1.0)
    assert [(s, t) for s, t, _ in got] == [(s, t) for s, t, _ in expected]
    assert [score for *_, score in got] == pytest.approx([score for *_, score in expected], abs=1e-5)


def test_deterministic_sorted_one_to_one_and_chunk_independent():
    src, tgt, _ = planted(seed=2)
    config = MiningConfig(threshold=1.0, chunk_size=4096)
    first = mine(src, tgt, config)
    assert first.as_list() == mine(src, tgt, config).as_list()  # same call, same chunks: bit-identical
    chunked = mine(src.numpy(), tgt.numpy(), MiningConfig(threshold=1.0, chunk_size=7))
    # Another chunk size changes the float summation order (scores differ by ~1e-7 on some
    # BLAS builds), never the pairs or their order.
    # The same pairs exactly; each pair's score within float32 rounding (near-ties may swap order).
    first_scores = {(s, t): score for s, t, score in first.as_list()}
    chunked_scores = {(s, t): score for s, t, score in chunked.as_list()}
    assert sorted(first_scores) == sorted(chunked_scores)
    for pair, score in first_scores.items():
        assert chunked_scores[pair] == pytest.approx(score, rel=1e-5, abs=1e-6), pair
    scores = first.scores.tolist()
    assert scores == sorted(scores, reverse=True) and min(scores) >= 1.0
    assert len(set(first.src.tolist())) == len(first) and len(set(first.tgt.tolist())) == len(first)


def test_forward_and_backward_cover_each_side_once():
    src, tgt, _ = planted(seed=3, nx=50, ny=40, pairs=20)
    fwd = mine(src, tgt, MiningConfig(mode="forward", threshold=-10.0))
    bwd = mine(src, tgt, MiningConfig(mode="backward", threshold=-10.0))
    assert sorted(fwd.src.tolist()) == list(range(50))
    assert sorted(bwd.tgt.tolist()) == list(range(40))


def test_bad_input_and_config_are_named():
    src, tgt, _ = planted(seed=4, nx=20, ny=20, pairs=5)
    src[[3, 8]] = float("nan")
    with pytest.raises(InvalidEmbeddingsError, match=r"source embeddings: 2 NaN/inf \(rows 3, 8\)"):
        mine(src, tgt)
    tgt[5] = 0.0
    with pytest.raises(InvalidEmbeddingsError, match=r"target embeddings: 1 zero-norm \(rows 5\)"):
        mine(torch.randn(20, 64), tgt)
    with pytest.raises(ValueError, match="differ in dimension: 64 vs 32"):
        mine(torch.randn(5, 64), torch.randn(5, 32))
    with pytest.raises(ValueError, match="--mining.mode must be one of"):
        MiningConfig(mode="both")
    with pytest.raises(ValueError, match=r"--mining.threshold 1.06 can never be reached with --mining.margin absolute"):
        MiningConfig(margin="absolute")
    with pytest.raises(ValueError, match=r"--mining.threshold 2.5 can never be reached with --mining.margin distance"):
        MiningConfig(margin="distance", threshold=2.5)
    with pytest.raises(ValueError, match=r"--mining.k must be >= 1, got 0"):
        MiningConfig(k=0)


_MEMORY_PROBE = """
import json, resource, torch
from alignment.evaluate.mining import MiningConfig, mine
g = torch.Generator().manual_seed(0)
n, d = 10_000, 64
x = torch.randn(n, d, generator=g)
perm = torch.randperm(n, generator=g)
y = (torch.nn.functional.normalize(x, dim=1) + 0.3 * torch.randn(n, d, generator=g) / d**0.5)[perm]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
mined = mine(x, y, MiningConfig(chunk_size=1024, threshold=1.0))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
inverse = torch.empty_like(perm)
inverse[perm] = torch.arange(n)
correct = int((inverse[mined.src] == mined.tgt).sum())
print(json.dumps({"pairs": len(mined), "correct": correct, "growth_mb": (after - before) / 1024}))
"""


def test_10k_by_10k_exact_search_stays_chunked():
    """A full 10k x 10k float32 score matrix is 400 MB; chunks of 1024 queries need ~40 MB each."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["pairs"] == result["correct"] == 10_000
    assert result["growth_mb"] < 250, result


def test_backend_resolution_without_faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        assert resolve_backend("auto", 10**12) == "exact"
        with pytest.raises(ImportError, match="faiss is not installed"):
            resolve_backend("faiss", 10)
    else:
        assert resolve_backend("auto", 10**12) == "faiss"
    assert resolve_backend("auto", 10) == "exact" and resolve_backend("exact", 10**12) == "exact"
    with pytest.raises(ValueError, match="k-NN backend must be one of"):
        resolve_backend("annoy", 10)


def test_faiss_path_matches_exact_path():
    pytest.importorskip("faiss")
    src, tgt, _ = planted(seed=5)
    x, y = F.normalize(src, dim=1), F.normalize(tgt, dim=1)
    sims_exact, idx_exact = knn(x, y, 4, backend="exact")
    sims_faiss, idx_faiss = knn(x, y, 4, backend="faiss")
    assert torch.equal(idx_exact, idx_faiss) and torch.allclose(sims_exact, sims_faiss, atol=1e-5)
    exact = mine(src, tgt, MiningConfig(threshold=1.0, backend="exact"))
    via_faiss = mine(src, tgt, MiningConfig(threshold=1.0, backend="faiss"))
    assert [(s, t) for s, t, _ in exact.as_list()] == [(s, t) for s, t, _ in via_faiss.as_list()]
