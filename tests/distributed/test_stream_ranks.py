"""The stream across real ranks: 2 gloo ranks x 2 DataLoader workers, with fork and with spawn workers.

Each rank is its own process with a gloo process group (so ``get_rank()`` comes
from the group) and ``RANK`` / ``WORLD_SIZE`` set as a launcher would. Spawned
DataLoader workers have neither a group nor (reliably) the launcher's view of
the node: this pins the bug where webdataset's own node split let every
spawned worker read every shard. Shards are uneven so the row balancing is
exercised, and every step runs a collective, as training does, so a rank with
fewer batches would hang (timeout) instead of passing.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import webdataset as wds

from alignment.synthetic import synthetic_rows

pytestmark = pytest.mark.distributed

LANGS = ["de", "en", "es", "fr"]
SHARD_SIZES = [17, 9, 23, 5, 14, 11, 8, 20, 6]  # 113 rows, uneven
WORLD, WORKERS, BATCH = 2, 2, 5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_shards(directory: Path) -> tuple[list[str], list[str]]:
    rows = synthetic_rows(sum(SHARD_SIZES), LANGS, seed=4, missing_prob=0.3)
    paths, start = [], 0
    for i, size in enumerate(SHARD_SIZES):
        path = directory / f"corpus-{i:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for row in rows[start : start + size]:
                sink.write({"__key__": row.id, "json": row.to_json()})
        paths.append(str(path))
        start += size
    return paths, [row.id for row in rows]


def _rank_main(rank: int, port: int, shards: list[str], context: str, out_dir: str) -> None:
    """One rank: read epochs 0 and 1 through a DataLoader with 2 workers, record what arrived."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from alignment import distributed
    from alignment.data.config import StreamConfig
    from alignment.data.stream import MultiWayStream
    from alignment.synthetic import tiny_tokenizer

    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30))
    try:
        assert distributed.is_initialized() and distributed.get_rank() == rank
        config = StreamConfig(batch_size=BATCH, languages=LANGS, shuffle_buffer=8, seed=7)
        stream = MultiWayStream(shards, tiny_tokenizer(), config, num_workers=WORKERS)
        # torchrun exports RANK; Lightning's SLURM and spawn launchers do not. Without it a spawned worker has
        # no way to learn its rank but the value the stream captured above (re-reading it would give rank 0).
        del os.environ["RANK"], os.environ["WORLD_SIZE"]
        record = {"rank": stream.rank, "world": stream.world_size, "len": len(stream), "epochs": []}
        for epoch in (0, 1):
            stream.set_epoch(epoch)
            loader = DataLoader(stream, batch_size=None, num_workers=WORKERS, multiprocessing_context=context)
            batches = []
            for batch in loader:
                batches.append({"keys": list(batch.row_keys), "worker": batch.origin[1]})
                rows = torch.tensor([batch.num_rows])
                dist.all_reduce(rows)  # a collective per step: unequal batch counts hang here
            record["epochs"].append({"order": list(stream.plan(epoch).order), "batches": batches})
        dist.barrier()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_ranks_split_shards_once_with_equal_batches(tmp_path, context):
    shards, all_ids = _write_shards(tmp_path)
    mp.spawn(_rank_main, args=(_free_port(), shards, context, str(tmp_path)), nprocs=WORLD, join=True)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    assert [r["rank"] for r in records] == [0, 1] and all(r["world"] == WORLD for r in records)
    for epoch in (0, 1):
        per_rank = [r["epochs"][epoch] for r in records]
        keys = [k for rank in per_rank for batch in rank["batches"] for k in batch["keys"]]
        assert len(keys) == len(set(keys)), "a row was read twice"
        assert sorted(keys) == sorted(all_ids), "the ranks did not cover every row"
        counts = [len(rank["batches"]) for rank in per_rank]
        assert counts == [records[0]["len"]] * WORLD, f"unequal batches per rank: {counts}"
        assert all(len(b["keys"]) <= BATCH for rank in per_rank for b in rank["batches"])
        assert per_rank[0]["order"] == per_rank[1]["order"]  # same shard permutation on every rank
        for rank in per_rank:  # both workers of each rank read
            assert {b["worker"] for b in rank["batches"]} == set(range(WORKERS))
    for record in records:
        epoch0, epoch1 = ([k for b in e["batches"] for k in b["keys"]] for e in record["epochs"])
        assert epoch0 != epoch1  # reshuffled
    assert records[0]["epochs"][0]["order"] != records[0]["epochs"][1]["order"]
