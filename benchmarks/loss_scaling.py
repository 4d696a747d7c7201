"""Time and peak memory of the contrastive loss, the cross-device gather and GradCache.

Three measurements, each configuration in a fresh subprocess so that peak
resident memory (``ru_maxrss``) belongs to that configuration alone:

1. **loss**: ``multiway_infonce`` (multi_positive, forward + backward) on
   global batches of 256..16,384 unit embeddings of width 768 (rows of 4
   languages). *local*: one rank's slice, ``n = B / world`` anchors against
   all ``B`` gathered candidates (the world is simulated in one process: the
   candidates are built exactly as ``gather_candidates`` builds them, without
   the collective); *full*: every rank materialising the whole ``B x B``
   logits matrix, what a loss without local anchors costs per rank.
2. **gather**: ``alignment.distributed.gather_candidates`` forward + backward
   on a real 2-rank gloo group (the machine's cores), ``B / 2`` embeddings per rank.
3. **gradcache**: one training step of a small random BERT (hidden 256, 4
   layers, 64 tokens) on 512 sentences, plain path versus GradCache chunks.

A configuration that runs past ``--budget-s`` is reported as such in the table,
not skipped. Results: ``benchmarks/results/loss_scaling-<date>-<machine>.{md,json}``.

    python benchmarks/loss_scaling.py                  # everything (about 5-10 min on 2 cores)
    python benchmarks/loss_scaling.py --sizes 256 1024 --skip gradcache
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, also when loaded by path
from _common import (  # noqa: E402
    RESULTS,
    command_line,
    machine_info,
    machine_lines,
    machine_tag,
    markdown_table,
    now,
    result_stem,
    write_results,
)

DEFAULT_SIZES = (256, 512, 1024, 2048, 4096, 8192, 16384)


# --------------------------------------------------------------------------- child side


def _rss_mib() -> float:
    """Current resident set size (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _multiway_embeddings(n: int, dim: int, langs: int = 4, seed: int = 0):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, dim, generator=g), dim=-1)  # (n, D)
    rows = torch.arange(n) // langs  # (n,)
    lang_ids = torch.arange(n) % langs  # (n,)
    return emb, rows, lang_ids


def child_loss(size: int, dim: int, mode: str, world: int) -> dict:
    import torch

    from alignment.losses import GlobalCandidates, candidates_from_gathered, multiway_infonce

    warm, warm_rows, warm_langs = _multiway_embeddings(64, dim)  # first-call costs (thread pool, allocator)
    multiway_infonce(warm, GlobalCandidates.single(warm, warm_rows, warm_langs))
    emb, rows, langs = _multiway_embeddings(size, dim)
    if mode == "full":
        leaf = emb.requires_grad_(True)
        cands, anchors = GlobalCandidates.single(leaf, rows, langs), leaf  # B anchors x B candidates
    else:
        n = size // world  # rank 0's slice; whole rows since n is a multiple of 4
        leaf = emb.requires_grad_(True)
        meta = torch.stack([rows % (n // 4), langs], dim=-1).view(world, n, 2)  # batch-local row ids per rank
        counts = [(n, n // 4, 4)] * world
        cands, anchors = candidates_from_gathered(leaf, meta, counts, rank=0), leaf[:n]  # n x B
    base = _rss_mib()
    seconds = _best_time(lambda: multiway_infonce(anchors, cands, temperature=0.05)["contrastive_loss"].backward())
    return {"seconds": seconds, "peak_mib": _peak_mib(), "delta_mib": _peak_mib() - base,
            "anchors": anchors.shape[0], "candidates": cands.emb.shape[0]}


def _best_time(step, max_repeats: int = 3, within_s: float = 10.0) -> float:
    """Fastest of up to ``max_repeats`` runs (while they stay quick): the machine is shared."""
    times, spent = [], 0.0
    while len(times) < max_repeats and spent < within_s:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return min(times)


def child_gather(size: int, dim: int) -> dict:
    """Runs on each of 2 ranks (env:// rendezvous); returns this rank's numbers."""
    import torch
    import torch.distributed as dist

    from alignment.distributed import gather_candidates

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    emb, rows, langs = _multiway_embeddings(size // world, dim, seed=rank)
    emb.requires_grad_(True)
    gather_candidates(emb, rows, langs)  # warm-up: gloo connections
    base = _rss_mib()
    # Every rank runs the same number of repeats (a fixed 3): collectives must match.
    times = []
    for _ in range(3):
        start = time.perf_counter()
        gather_candidates(emb, rows, langs).emb.sum().backward()  # backward: the reduce-scatter
        times.append(time.perf_counter() - start)
    seconds = min(times)
    dist.destroy_process_group()
    return {"seconds": seconds, "peak_mib": _peak_mib(), "delta_mib": _peak_mib() - base, "rank": rank}


def child_gradcache(chunk: int, sentences: int, seq_len: int) -> dict:
    import torch

    from alignment.batch import Batch
    from alignment.gradcache import GradCache
    from alignment.losses import GlobalCandidates, MultiWayContrastiveLoss, total_loss
    from alignment.model import DualEncoder

    torch.manual_seed(0)
    # Dropout off: chunking changes how many random numbers each dropout call
    # draws, so only without dropout must every path give the same loss (a check).
    config = DualEncoder.tiny_config(1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=1024, max_position_embeddings=seq_len,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    encoder = DualEncoder.from_config(config).train()
    batch = Batch(
        input_ids=torch.randint(5, 1000, (sentences, seq_len)),
        attention_mask=torch.ones(sentences, seq_len, dtype=torch.long),
        row_ids=torch.arange(sentences) // 4,
        lang_ids=torch.arange(sentences) % 4,
        languages=("de", "en", "es", "fr"),
        pivot_lang_id=1,
        row_keys=tuple(str(i) for i in range(sentences // 4)),
    )
    loss_module = MultiWayContrastiveLoss()

    def loss_fn(emb, b):
        return loss_module(emb, GlobalCandidates.single(emb, b.row_ids, b.lang_ids))

    base = _rss_mib()
    start = time.perf_counter()
    if chunk:
        out = GradCache(encoder, loss_fn, chunk).step(batch)
    else:
        out = loss_fn(encoder(batch), batch)
        total_loss(out).backward()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": _peak_mib(), "delta_mib": _peak_mib() - base,
            "loss": float(out["contrastive_loss"])}


# --------------------------------------------------------------------------- parent side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_child(args: list[str], budget: float, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"exceeded the {budget:.0f} s budget"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"status": f"failed (exit {proc.returncode}): {tail[0][:200]}"}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def _run_gather(size: int, dim: int, budget: float) -> dict:
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [sys.executable, __file__, "--child", "gather", "--size", str(size), "--dim", str(dim)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    deadline = time.monotonic() + budget
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            return {"status": f"exceeded the {budget:.0f} s budget"}
        if p.returncode != 0:
            return {"status": f"failed (exit {p.returncode}): {err.strip().splitlines()[-1][:200]}"}
        results.append(json.loads(out.strip().splitlines()[-1]))
    worst = max(results, key=lambda r: r["seconds"])
    return {"status": "ok", "seconds": worst["seconds"], "peak_mib": max(r["peak_mib"] for r in results),
            "delta_mib": max(r["delta_mib"] for r in results)}


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: line.split()[1] for line in f}
    return int(info["MemAvailable"]) / 2**20


def _memory_guard(bytes_per_pair: float | None, pairs: int, max_gib: float) -> dict | None:
    """Refuse a run whose memory, extrapolated from the previous size, would not fit.

    The machine is shared: an out-of-memory kill could hit someone else's job.
    """
    if bytes_per_pair is None:
        return None
    estimate = bytes_per_pair * pairs / 2**30 * 1.1
    limit = min(max_gib, _available_gib() - 4.0)
    if estimate > limit:
        return {"status": f"not run: needs about {estimate:.1f} GiB (limit {limit:.1f} GiB)"}
    return None


def _fmt(result: dict) -> tuple[str, str]:
    if result["status"] != "ok":
        return result["status"], "-"
    return f"{result['seconds']:.3f}", f"{result['delta_mib']:.0f} (peak {result['peak_mib']:.0f})"


def _bytes_per_pair(report: dict) -> str:
    values = [r[m]["delta_mib"] * 2**20 / (r[m]["anchors"] * r[m]["candidates"])
              for r in report["loss"] for m in ("local", "full")
              if r[m]["status"] == "ok" and r[m]["anchors"] * r[m]["candidates"] >= 2**22]
    if not values:
        return "?"
    low, high = round(min(values)), round(max(values))
    return f"{low}" if low == high else f"{low}-{high}"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Loss, gather and GradCache scaling ({report['date'][:10]})",
        "",
        *machine_lines(m),
        f"- command: `{report['command']}`",
        "- Memory: MiB added to the resident set by the measured step (peak RSS of the fresh process "
        "in parentheses), from `getrusage(RUSAGE_SELF).ru_maxrss`; one process per configuration.",
        "- Shared machine: other jobs ran concurrently, so times are indicative: best of up to 3 runs "
        "(1 when a run is long) after a small warm-up.",
        "",
        f"## Loss forward + backward (multi_positive, width {report['dim']}, rows of 4 languages)",
        "",
        f"*local*: one rank of a simulated world of {report['world']}: B/{report['world']} anchors x B "
        "candidates (the collective itself is measured below). *full*: the whole B x B logits matrix.",
        "",
        markdown_table(["global batch B", "local s", "local MiB", "full s", "full MiB"],
                       [[row["size"], *_fmt(row["local"]), *_fmt(row["full"])] for row in report["loss"]], "rrrrr"),
    ]
    lines += ["", "Both columns run the same code (`multiway_infonce`); only the number of local anchors differs. "
              "Memory is about " + _bytes_per_pair(report) + " bytes per (anchor, candidate) pair: "
              "logits, masks, the two log-sum-exp inputs kept for backward, their gradients and the metrics."]
    if report["gather"]:
        lines += ["", f"## gather_candidates forward + backward, real gloo, 2 ranks, width {report['dim']}", "",
                  markdown_table(["global batch B", "per rank", "s (slowest rank)", "MiB (max over ranks)"],
                                 [[row["size"], row["size"] // 2, *_fmt(row["result"])] for row in report["gather"]],
                                 "rrrr")]
    if report["gradcache"]:
        g = report["gradcache_setup"]
        lines += ["", f"## GradCache versus the plain path: one step of a random BERT (hidden 256, 4 layers), "
                      f"{g['sentences']} sentences x {g['seq_len']} tokens", "",
                  markdown_table(["path", "s", "MiB", "loss"], [
                      ["plain (one forward with gradients)" if not row["chunk"] else f"GradCache, chunk {row['chunk']}",
                       *_fmt(row["result"]),
                       f"{row['result']['loss']:.6f}" if row["result"]["status"] == "ok" else "-"]
                      for row in report["gradcache"]])]
        lines += ["", "Dropout is off here so every path must give the same loss (a check that chunking is "
                  "exact); with dropout GradCache replays each chunk's RNG state (tests/unit/test_gradcache.py)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="global batch sizes B")
    parser.add_argument("--dim", type=int, default=768, help="embedding width")
    parser.add_argument("--world", type=int, default=8, help="simulated world size for the local loss")
    parser.add_argument("--budget-s", type=float, default=240.0, help="time budget per configuration")
    parser.add_argument("--max-mem-gib", type=float, default=14.0,
                        help="do not start a loss run whose extrapolated memory exceeds this (or free memory - 4 GiB)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 64, 16], help="GradCache chunks (0 = plain)")
    parser.add_argument("--sentences", type=int, default=256, help="GradCache batch (sentences)")
    parser.add_argument("--seq-len", type=int, default=64, help="GradCache tokens per sentence")
    parser.add_argument("--skip", nargs="*", default=[], choices=["loss", "gather", "gradcache"])
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = {
            "loss": lambda: child_loss(args.size, args.dim, args.mode, args.world),
            "gather": lambda: child_gather(args.size, args.dim),
            "gradcache": lambda: child_gradcache(args.chunk, args.sentences, args.seq_len),
        }[args.child]()
        print(json.dumps(result))
        return 0

    for size in args.sizes:
        if size % (4 * args.world):
            parser.error(f"--sizes: {size} is not a multiple of 4 x --world ({4 * args.world})")
    report = {
        "date": now(),
        "command": command_line("loss_scaling.py", argv),
        "machine": machine_info(),
        "dim": args.dim,
        "world": args.world,
        "loss": [],
        "gather": [],
        "gradcache": [],
        "gradcache_setup": {"sentences": args.sentences, "seq_len": args.seq_len},
    }
    common = ["--dim", str(args.dim), "--world", str(args.world)]
    if "loss" not in args.skip:
        bytes_per_pair: dict[str, float] = {}
        for size in args.sizes:
            row = {"size": size}
            for mode in ("local", "full"):
                pairs = size * size // (args.world if mode == "local" else 1)
                skip = _memory_guard(bytes_per_pair.get(mode), pairs, args.max_mem_gib)
                row[mode] = skip or _run_child(["loss", "--size", str(size), "--mode", mode, *common], args.budget_s)
                if row[mode]["status"] == "ok":
                    bytes_per_pair[mode] = row[mode]["delta_mib"] * 2**20 / pairs
                print(f"loss B={size} {mode}: {row[mode]}", flush=True)
            report["loss"].append(row)
    if "gather" not in args.skip:
        for size in args.sizes:
            result = _run_gather(size, args.dim, args.budget_s)
            print(f"gather B={size}: {result}", flush=True)
            report["gather"].append({"size": size, "result": result})
    if "gradcache" not in args.skip:
        for chunk in args.chunks:
            result = _run_child(["gradcache", "--chunk", str(chunk), "--sentences", str(args.sentences),
                                 "--seq-len", str(args.seq_len)], args.budget_s)
            print(f"gradcache chunk={chunk}: {result}", flush=True)
            report["gradcache"].append({"chunk": chunk, "result": result})

    md, js = write_results(args.out, result_stem("loss_scaling", report["date"], machine_tag(report["machine"])),
                           markdown(report), report)
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
