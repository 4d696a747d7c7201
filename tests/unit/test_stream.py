"""The streaming pipeline (alignment/data/stream.py) and its LightningDataModule (alignment/data/datamodule.py).

Shards are real WebDataset tars written in tmp_path in the decided shard format
(`<key>.json` = {"id", "pivot", "texts"}); the tokenizer is the real fast
synthetic tokenizer.
"""

from __future__ import annotations

import json
import random
import tarfile
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from alignment.batch import Batch
from alignment.data.collate import select_languages
from alignment.data.config import StreamConfig
from alignment.data.datamodule import AlignmentDataModule, DataConfig
from alignment.data.plan import ShardRef, count_shard_rows, plan_epoch, round_robin_taken
from alignment.data.samples import SkippedSampleWarning
from alignment.data.stream import MultiWayStream
from alignment.synthetic import synthetic_rows, tiny_tokenizer

LANGS = ["de", "en", "es", "fr"]


# --------------------------------------------------------------------------- helpers


def write_tar(path: Path, samples: list[tuple[str, bytes]]) -> str:
    """A shard of raw `(key, json bytes)` samples, exactly as the shard writer lays them out."""
    with wds.TarWriter(str(path), encoder=False) as sink:
        for key, payload in samples:
            sink.write({"__key__": key, "json": payload})
    return str(path)


def row_payloads(rows) -> list[tuple[str, bytes]]:
    return [(row.id, json.dumps(row.to_json()).encode()) for row in rows]


def write_shards(directory: Path, rows, sizes: list[int]) -> list[str]:
    """Rows split into shards of the given (uneven) sizes."""
    directory.mkdir(parents=True, exist_ok=True)
    paths, start = [], 0
    for i, size in enumerate(sizes):
        paths.append(write_tar(directory / f"corpus-{i:06d}.tar", row_payloads(rows[start : start + size])))
        start += size
    assert start == len(rows)
    return paths


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def rows():
    return synthetic_rows(67, LANGS, seed=3, missing_prob=0.3)


@pytest.fixture
def shards(tmp_path, rows):
    return write_shards(tmp_path / "shards", rows, [13, 9, 11, 7, 12, 5, 10])


def read_epoch(stream: MultiWayStream, epoch: int = 0, start: int = 0, context: str = "fork") -> list[Batch]:
    stream.set_epoch(epoch, start)
    kwargs = {"multiprocessing_context": context} if stream.num_workers else {}
    return list(DataLoader(stream, batch_size=None, num_workers=stream.num_workers, **kwargs))


def keys_of(batches: list[Batch]) -> list[str]:
    return [key for batch in batches for key in batch.row_keys]


def sentences(batch: Batch, tokenizer) -> list[tuple[str, str, str]]:
    """(row key, language, decoded text) per sentence of a batch."""
    out = []
    for i in range(batch.num_sentences):
        ids = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
        text = tokenizer.decode(ids, skip_special_tokens=True)
        out.append((batch.row_keys[batch.row_ids[i]], batch.languages[batch.lang_ids[i]], text))
    return out


# --------------------------------------------------------------------------- language policies


def test_select_languages_policies():
    rng = random.Random(0)
    available = ["de", "en", "fr"]
    assert select_languages(available, policy="all", k=2, pivot="en", rng=rng) == available
    picks = [tuple(select_languages(available, policy="k", k=2, pivot="en", rng=rng)) for _ in range(200)]
    assert all(len(p) == 2 and set(p) <= set(available) for p in picks)
    assert set(picks) == {("de", "en"), ("de", "fr"), ("en", "fr")}  # uniform over all pairs, pivot not forced
    assert select_languages(["de", "en"], policy="k", k=3, pivot="en", rng=rng) == ["de", "en"]  # fewer than k: all
    pairs = [tuple(select_languages(available, policy="pivot_pair", k=2, pivot="en", rng=rng)) for _ in range(100)]
    assert set(pairs) == {("de", "en"), ("en", "fr")}
    assert select_languages(["de", "fr"], policy="pivot_pair", k=2, pivot="en", rng=rng) is None


@pytest.mark.parametrize("policy", ["all", "k", "pivot_pair"])
def test_stream_applies_language_policy_to_rows_missing_languages(tmp_path, tokenizer, policy):
    rows = synthetic_rows(40, LANGS, seed=1, missing_prob=0.5)
    no_pivot = [row.id for row in rows[:5]]
    for row in rows[:5]:  # rows without the pivot
        row.texts.pop("en")
        row.texts.setdefault("de", "dexx")
        row.texts.setdefault("fr", "frxx")
    shards = write_shards(tmp_path, rows, [20, 20])
    cfg = StreamConfig(batch_size=8, languages=LANGS, language_policy=policy, k=3, shuffle_buffer=0)
    batches = read_epoch(MultiWayStream(shards, tokenizer, cfg))
    by_row: dict[str, list[str]] = {}
    for batch in batches:
        for key, lang, _ in sentences(batch, tokenizer):
            by_row.setdefault(key, []).append(lang)
    source = {row.id: sorted(row.texts) for row in rows}
    for key, langs in by_row.items():
        assert langs == sorted(langs) and set(langs) <= set(source[key])
        if policy == "all":
            assert langs == source[key]
        elif policy == "k":
            assert len(langs) == min(3, len(source[key]))
        else:
            assert len(langs) == 2 and "en" in langs
    skipped = batches[-1].skip_counts
    if policy == "pivot_pair":
        assert set(by_row) == {row.id for row in rows} - set(no_pivot)
        assert skipped == {"no_pivot": 5}
    else:
        assert set(by_row) == {row.id for row in rows} and skipped == {}


# --------------------------------------------------------------------------- collation


def test_collation_lines_up_rows_languages_and_texts(shards, rows, tokenizer):
    cfg = StreamConfig(batch_size=5, languages=LANGS, shuffle_buffer=16)
    stream = MultiWayStream(shards, tokenizer, cfg, num_workers=2)
    batches = read_epoch(stream)
    texts = {row.id: row.texts for row in rows}
    seen = 0
    for batch in batches:
        assert batch.languages == tuple(LANGS) and batch.pivot_lang_id == LANGS.index("en")
        assert batch.row_ids.tolist() == sorted(batch.row_ids.tolist())  # row-major
        assert set(batch.row_ids.tolist()) == set(range(batch.num_rows))
        for key, lang, decoded in sentences(batch, tokenizer):
            assert decoded == texts[key][lang]
            seen += 1
    assert seen == sum(len(t) for t in texts.values())
    moved = batches[0].to("cpu")
    assert (moved.skip_counts, moved.origin, moved.row_keys) == (batches[0].skip_counts, batches[0].origin, batches[0].row_keys)
    assert {b.origin for b in batches} == {(0, 0), (0, 1)}  # (epoch, worker)


def test_prefix_and_max_length(shards, rows, tokenizer):
    cfg = StreamConfig(batch_size=8, languages=LANGS, text_prefix="query: ", max_length=6, shuffle_buffer=0)
    batches = read_epoch(MultiWayStream(shards, tokenizer, cfg))
    unk, cls, sep = tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id
    texts = {row.id: row.texts for row in rows}
    for batch in batches:
        assert batch.input_ids.shape[1] <= 6
        for i in range(batch.num_sentences):
            ids = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
            assert ids[:3] == [cls, unk, unk]  # "query" and ":" are not in the tiny vocabulary
            assert ids[-1] == sep
            text = texts[batch.row_keys[batch.row_ids[i]]][batch.languages[batch.lang_ids[i]]]
            words = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert ids[3:-1] == words[: len(ids) - 4]  # truncated to max_length, special tokens included
            assert len(ids) == min(6, len(words) + 4)


def test_padding_stats_count_real_and_padded_tokens(shards, tokenizer):
    cfg = StreamConfig(batch_size=6, languages=LANGS, shuffle_buffer=0)
    for batch in read_epoch(MultiWayStream(shards, tokenizer, cfg)):
        real = sum(len(tokenizer(t)["input_ids"]) for _, _, t in sentences(batch, tokenizer))
        assert batch.real_tokens == real
        assert batch.padded_tokens == batch.input_ids.numel() - real
        assert batch.padded_tokens == int((batch.input_ids == tokenizer.pad_token_id).sum())
        assert 0 <= batch.padding_ratio < 1


def test_bucketing_lowers_padding_and_keeps_every_row(tmp_path, tokenizer):
    rows = synthetic_rows(400, LANGS, seed=5, min_words=1, max_words=30)
    shards = write_shards(tmp_path, rows, [100, 100, 100, 100])
    plain = StreamConfig(batch_size=16, languages=LANGS, shuffle_buffer=64)
    bucketed = StreamConfig(batch_size=16, languages=LANGS, shuffle_buffer=64, bucketing=True, bucket_buffer=256)
    results = {}
    for name, cfg in (("plain", plain), ("bucketed", bucketed)):
        batches = read_epoch(MultiWayStream(shards, tokenizer, cfg, num_workers=2))
        assert sorted(keys_of(batches)) == sorted(row.id for row in rows)
        assert all(b.num_rows <= 16 for b in batches)
        results[name] = sum(b.padded_tokens for b in batches) / sum(b.input_ids.numel() for b in batches)
    assert results["bucketed"] < 0.5 * results["plain"], results


# --------------------------------------------------------------------------- bad input


def test_corrupt_shards_and_bad_samples_are_skipped_and_counted(tmp_path, tokenizer):
    good = synthetic_rows(30, LANGS, seed=7)
    bad_samples = [
        ("bad-json", b'{"id": "x", "texts": {"en": "enxx"'),
        ("not-an-object", b'["en", "de"]'),
        ("unknown-lang", json.dumps({"id": "u", "texts": {"en": "enab", "xx-notalang-123456789": "x"}}).encode()),
        ("no-text", json.dumps({"id": "n", "texts": {"en": "  ", "de": ""}}).encode()),
        ("one-text", json.dumps({"id": "o", "texts": {"en": "enab", "ko": "outside the vocabulary"}}).encode()),
    ]
    mixed = write_tar(tmp_path / "mixed.tar", row_payloads(good[:10]) + bad_samples)
    truncated = write_tar(tmp_path / "truncated.tar", row_payloads(good[10:20]))
    data = Path(truncated).read_bytes()
    Path(truncated).write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(random.Random(0).randbytes(5000))
    clean = write_tar(tmp_path / "clean.tar", row_payloads(good[20:30]))
    shards = [ShardRef(mixed, 15), ShardRef(truncated, 10), ShardRef(str(garbage), 10), ShardRef(clean, 10)]
    cfg = StreamConfig(batch_size=4, languages=LANGS, shuffle_buffer=8)
    stream = MultiWayStream(shards, tokenizer, cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = read_epoch(stream)
    assert len(batches) == len(stream) == 12  # planned from the manifest counts (45 rows), emitted in full
    counts = batches[-1].skip_counts
    kept = keys_of(batches)
    assert counts == {"bad_json": 2, "unknown_language": 1, "no_usable_text": 2, "corrupt_tar": 2}
    assert {r.id for r in good[:10] + good[20:30]} <= set(kept)
    assert set(kept) <= {r.id for r in good} and len(kept) == len(set(kept))
    assert 20 < len(kept) < 30  # the truncated shard kept the samples before the cut
    messages = [str(w.message) for w in caught if issubclass(w.category, SkippedSampleWarning)]
    assert len(messages) == 4  # once per reason
    assert any("corrupt_tar" in m and ("garbage.tar" in m or "truncated.tar" in m) for m in messages)
    assert any("'bad-json'" in m and "mixed.tar" in m for m in messages)


def test_truncation_at_a_header_boundary_is_caught_by_the_row_count(tmp_path, tokenizer):
    rows = synthetic_rows(10, LANGS, seed=2)
    path = write_tar(tmp_path / "cut.tar", row_payloads(rows))
    with tarfile.open(path) as archive:
        cut = archive.getmembers()[3].offset  # the 4th header: whole members only, the tar reader ends silently
    Path(path).write_bytes(Path(path).read_bytes()[:cut])
    batches = read_epoch(MultiWayStream([ShardRef(path, 10)], tokenizer, StreamConfig(batch_size=4, languages=LANGS)))
    assert count_shard_rows(path) == 3
    assert len(batches) == 3 and batches[-1].skip_counts == {"corrupt_tar": 1}


def test_unplanned_rows_are_dropped_and_counted(tmp_path, tokenizer):
    rows = synthetic_rows(12, LANGS, seed=2)
    path = write_tar(tmp_path / "s.tar", row_payloads(rows))
    batches = read_epoch(MultiWayStream([ShardRef(path, 8)], tokenizer, StreamConfig(batch_size=4, languages=LANGS)))
    assert len(batches) == 2 and len(keys_of(batches)) == 8
    assert batches[-1].skip_counts == {"unplanned_rows": 4}


def test_rows_missing_are_replaced_by_smaller_and_empty_batches(tmp_path, tokenizer):
    rows = synthetic_rows(4, LANGS, seed=2)
    path = write_tar(tmp_path / "s.tar", row_payloads(rows))
    batches = read_epoch(MultiWayStream([ShardRef(path, 12)], tokenizer, StreamConfig(batch_size=4, languages=LANGS)))
    assert [b.num_rows for b in batches] == [4, 0, 0]
    assert batches[1].input_ids.shape == (0, 0) and batches[1].row_ids.shape == (0,)


# --------------------------------------------------------------------------- impossible configs


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"batch_size": 0}, "--data.batch_size"),
        ({"language_policy": "pairs"}, "--data.language_policy"),
        ({"language_policy": "k", "k": 1}, "--data.k"),
        ({"language_policy": "k", "k": 5, "languages": LANGS}, "--data.k"),
        ({"languages": ["en", "not a code"]}, "--data.languages"),
        ({"languages": ["de", "fr"]}, "--data.pivot"),
        ({"max_length": 1}, "--data.max_length"),
        ({"resampled": True}, "--data.resampled"),
        ({"steps_per_epoch": 10}, "--data.steps_per_epoch"),
        ({"resampled": True, "steps_per_epoch": 0}, "--data.steps_per_epoch"),
        ({"bucketing": True, "bucket_buffer": 8, "batch_size": 16}, "--data.bucket_buffer"),
        ({"num_workers": -1}, "--data.num_workers"),
        ({"multiprocessing_context": "forkserver"}, "--data.multiprocessing_context"),
    ],
)
def test_impossible_configs_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag.replace(".", r"\.")):
        DataConfig(**kwargs)


def test_setup_refuses_what_the_data_cannot_serve(shards, tokenizer):
    with pytest.raises(ValueError, match=r"--data\.k=5 but only 4 languages"):
        MultiWayStream(shards, tokenizer, StreamConfig(language_policy="k", k=5), languages=LANGS)
    with pytest.raises(ValueError, match=r"8 readers but only 7 shard.*--data\.num_workers"):
        MultiWayStream(shards, tokenizer, StreamConfig(languages=LANGS), num_workers=4, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"--data\.languages"):
        MultiWayStream(shards, tokenizer, StreamConfig())
    # resampled mode has no shards-per-reader requirement
    MultiWayStream(
        shards[:1], tokenizer, StreamConfig(languages=LANGS, resampled=True, steps_per_epoch=3), num_workers=2
    )


# --------------------------------------------------------------------------- plans


def test_plan_balances_ranks_and_changes_order_per_epoch():
    shards = [ShardRef(f"s{i}.tar", rows) for i, rows in enumerate([500, 500, 500, 500, 500, 500, 500, 130, 77])]
    plans = [plan_epoch(shards, world_size=2, num_workers=2, batch_size=32, seed=1, epoch=e) for e in range(4)]
    for plan in plans:
        urls = [s.url for rank in plan.slots for worker in rank for s in worker.shards]
        assert sorted(urls) == sorted(s.url for s in shards)  # every shard exactly once
        per_rank = [sum(len(w.batch_sizes) for w in rank) for rank in plan.slots]
        assert per_rank == [plan.batches_per_rank] * 2
        for rank in plan.slots:
            for worker in rank:
                assert sum(worker.batch_sizes) == worker.rows and all(0 < s <= 32 for s in worker.batch_sizes)
        rank_rows = [sum(w.rows for w in rank) for rank in plan.slots]
        assert abs(rank_rows[0] - rank_rows[1]) <= 500
    assert len({p.order for p in plans}) == 4  # reshuffled every epoch
    assert len({p.batches_per_rank for p in plans}) == 1  # ... with the same length
    again = plan_epoch(shards, world_size=2, num_workers=2, batch_size=32, seed=1, epoch=2)
    assert again == plans[2]  # what every rank computes independently


def test_round_robin_matches_the_dataloader_order():
    assert round_robin_taken([3, 1, 2], 0) == [0, 0, 0]
    assert round_robin_taken([3, 1, 2], 4) == [2, 1, 1]
    assert round_robin_taken([3, 1, 2], 5) == [2, 1, 2]
    assert round_robin_taken([3, 1, 2], 99) == [3, 1, 2]


def test_finite_resume_yields_exactly_the_rest_of_the_epoch(shards, tokenizer):
    cfg = StreamConfig(batch_size=4, languages=LANGS, shuffle_buffer=8, language_policy="k", k=2)
    stream = MultiWayStream(shards, tokenizer, cfg, num_workers=2)
    full = read_epoch(stream, epoch=1)
    resumed = read_epoch(stream, epoch=1, start=7)
    assert len(resumed) == len(full) - 7
    signature = lambda b: (b.row_keys, tuple(b.lang_ids.tolist()), b.input_ids.shape)  # noqa: E731
    assert Counter(map(signature, full[7:])) == Counter(map(signature, resumed))


# --------------------------------------------------------------------------- resampled mode


def test_resampled_yields_the_configured_count_and_is_reproducible_by_seed_and_step(shards, tokenizer):
    cfg = StreamConfig(batch_size=4, languages=LANGS, resampled=True, steps_per_epoch=9, shuffle_buffer=8)
    stream = MultiWayStream(shards, tokenizer, cfg, num_workers=2, rank=1, world_size=2)
    first = read_epoch(stream, epoch=0)
    assert len(first) == len(stream) == 9 and all(b.num_rows == 4 for b in first)
    assert [keys_of([b]) for b in read_epoch(stream, epoch=0)] == [keys_of([b]) for b in first]
    assert keys_of(read_epoch(stream, epoch=1)) != keys_of(first)
    resumed = read_epoch(stream, epoch=0, start=5)
    assert len(resumed) == 4
    assert keys_of(read_epoch(stream, epoch=0, start=5)) == keys_of(resumed)  # reseeded by step: reproducible
    other_seed = MultiWayStream(shards, tokenizer, replace(cfg, seed=1), num_workers=2)
    assert keys_of(read_epoch(other_seed, epoch=0)) != keys_of(first)
    per_sample = StreamConfig(batch_size=4, languages=LANGS, resampled=True, samples_per_epoch=50)
    assert len(MultiWayStream(shards, tokenizer, per_sample, rank=0, world_size=2)) == 7  # ceil(50 / (4 * 2))


# --------------------------------------------------------------------------- datamodule


class _Recorder:
    """A real LightningModule (tiny embedding bag) that records what each training step received."""

    @staticmethod
    def build(vocab_size: int):
        from lightning.pytorch import LightningModule

        class Recorder(LightningModule):
            def __init__(self):
                super().__init__()
                self.embedding = torch.nn.EmbeddingBag(vocab_size, 8)
                self.seen: list[tuple[int, tuple[str, ...]]] = []

            def training_step(self, batch, batch_idx):
                self.seen.append((self.current_epoch, batch.row_keys))
                pooled = self.embedding(batch.input_ids, per_sample_weights=None) if batch.num_sentences else None
                return pooled.pow(2).mean() if pooled is not None else None

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Recorder()


def _trainer(tmp_path, **kwargs):
    from lightning.pytorch import Trainer

    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    return Trainer(**{**defaults, **kwargs})


def test_datamodule_fit_sets_epochs_counts_skips_and_resumes(tmp_path, rows, tokenizer):
    from lightning.pytorch.callbacks import ModelCheckpoint

    shards = write_shards(tmp_path / "shards", rows, [13, 9, 11, 7, 12, 5, 10])
    bad = write_tar(tmp_path / "shards" / "bad.tar", [("b1", b"{oops"), ("b2", b"{oops")])
    cfg = DataConfig(train_shards=shards + [bad], batch_size=4, languages=LANGS, num_workers=2, shuffle_buffer=8)
    make = lambda: AlignmentDataModule(cfg, tokenizer=tokenizer)  # noqa: E731

    dm, module = make(), _Recorder.build(len(tokenizer))
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "epochs", save_top_k=-1)
    _trainer(tmp_path, max_epochs=2, callbacks=[every_epoch], enable_checkpointing=True).fit(module, datamodule=dm)
    per_epoch = [[keys for e, keys in module.seen if e == epoch] for epoch in (0, 1)]
    n = len(dm.train_stream)
    assert len(per_epoch[0]) == len(per_epoch[1]) == n
    for epoch_batches in per_epoch:
        flat = [k for keys in epoch_batches for k in keys]
        assert sorted(flat) == sorted(row.id for row in rows)
    assert per_epoch[0] != per_epoch[1]  # the trainer's epoch reached the workers
    assert dm.skip_counts() == {"bad_json": 4}  # 2 per epoch, summed over workers and epochs

    # Resume from the end-of-epoch-0 checkpoint: all of epoch 1, as the uninterrupted run had it.
    dm, module = make(), _Recorder.build(len(tokenizer))
    _trainer(tmp_path, max_epochs=2).fit(module, datamodule=dm, ckpt_path=str(tmp_path / "epochs" / f"epoch=0-step={n}.ckpt"))
    assert [keys for _, keys in module.seen] == per_epoch[1] and {e for e, _ in module.seen} == {1}
    assert dm.skip_counts() == {"bad_json": 4}

    # Interrupt epoch 1 after 5 batches, resume from the checkpoint: the rest of the epoch, nothing twice.
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=n + 5, save_top_k=-1)
    dm, module = make(), _Recorder.build(len(tokenizer))
    _trainer(tmp_path, max_steps=n + 5, callbacks=[checkpoints], enable_checkpointing=True).fit(module, datamodule=dm)
    ckpt = next((tmp_path / "ckpt").glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)
    state = saved["AlignmentDataModule"]
    assert (state["epoch"], state["batches_done"]) == (1, 5) and state["skip_counts"] == {"bad_json": 2}
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [state]  # the loader is resumable too
    before = [keys for e, keys in module.seen if e == 1]
    dm, module = make(), _Recorder.build(len(tokenizer))
    _trainer(tmp_path, max_epochs=2).fit(module, datamodule=dm, ckpt_path=str(ckpt))
    after = [keys for e, keys in module.seen if e == 1]
    assert len(before) + len(after) == n
    assert Counter(before + after) == Counter(per_epoch[1])  # exactly the uninterrupted epoch 1
    assert dm.skip_counts() == {"bad_json": 4}


def test_datamodule_loads_tokenizer_by_path_and_validates(tmp_path, rows, tokenizer):
    tiny_tokenizer(save_dir=tmp_path / "tok")
    shards = write_shards(tmp_path / "shards", rows, [13, 9, 11, 7, 12, 5, 10])
    cfg = DataConfig(
        train_shards=shards[:4],
        val_shards=shards[4:],
        tokenizer=str(tmp_path / "tok"),
        batch_size=4,
        languages=LANGS,
        num_workers=2,
        language_policy="pivot_pair",
    )
    dm = AlignmentDataModule(cfg)
    dm.setup("validate")
    assert dm.train_stream is None and dm.val_stream is not None
    assert dm.val_stream.num_workers == 2 and dm.val_stream.config.language_policy == "all"
    batches = list(dm.val_dataloader())
    assert sorted(keys_of(batches)) == sorted(row.id for row in rows[40:])
    assert dm.tokenizer.is_fast and dm.languages == tuple(LANGS)
    assert all(len(set(b.row_ids.tolist())) == b.num_rows for b in batches)
    # spawn workers are exercised in tests/distributed; here only that the setting reaches the loader
    spawn = AlignmentDataModule(replace(cfg, multiprocessing_context="spawn"), tokenizer=tokenizer)
    spawn.setup("fit")
    loader = spawn.train_dataloader()
    assert loader.multiprocessing_context.get_start_method() == "spawn" and not loader.persistent_workers


def test_datamodule_without_trainer_uses_set_epoch_and_resume(tmp_path, shards, tokenizer):
    cfg = DataConfig(train_shards=shards, batch_size=4, languages=LANGS, num_workers=0, shuffle_buffer=8)
    dm = AlignmentDataModule(cfg, tokenizer=tokenizer)
    dm.setup("fit")
    dm.set_epoch(3)
    loader = dm.train_dataloader()
    full = []
    for batch in loader:
        dm.observe_batch(batch)
        full.append(batch.row_keys)
        if len(full) == 6:
            state = dm.state_dict()
    assert state["epoch"] == 3 and state["batches_done"] == 6
    fresh = AlignmentDataModule(cfg, tokenizer=tokenizer)
    fresh.setup("fit")
    fresh.set_epoch(3)
    fresh.load_state_dict(state)
    assert [b.row_keys for b in fresh.train_dataloader()] == full[6:]  # one worker: same order too
    assert [b.row_keys for b in fresh.train_dataloader()] == full  # the resume applies once


def test_datamodule_reads_a_built_manifest(tmp_path, tokenizer):
    from alignment.data.build import build_shards
    from alignment.data.manifest import iter_shard_rows, resolve_shards
    from alignment.data.shards_write import ShardBuildConfig

    rows = synthetic_rows(300, LANGS, seed=11, missing_prob=0.2)
    build_shards(rows, ShardBuildConfig(out=tmp_path / "built", rows_per_shard=40, split="0.8,0.2,0"))
    cfg = DataConfig(
        train_shards=str(tmp_path / "built"), val_shards=str(tmp_path / "built"), batch_size=8, num_workers=2
    )
    dm = AlignmentDataModule(cfg, tokenizer=tokenizer)
    dm.setup("fit")
    assert dm.languages == tuple(LANGS)  # the manifest's vocabulary
    for split, loader in (("train", dm.train_dataloader()), ("validation", dm.val_dataloader())):
        expected = [row.id for info in resolve_shards(tmp_path / "built", split) for _, row in iter_shard_rows(info.url)]
        batches = list(loader)
        assert sorted(keys_of(batches)) == sorted(expected) and len(batches) == len(loader.dataset)


def test_datamodule_names_a_missing_shard_path(tmp_path, tokenizer):
    """Regression: a wrong --data.config.train_shards used to surface as 'no language vocabulary'."""
    missing = tmp_path / "no-such-shards"
    dm = AlignmentDataModule(DataConfig(train_shards=str(missing), batch_size=4), tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match=r"--data\.train_shards: .*no-such-shards"):
        dm.setup("fit")
    dm = AlignmentDataModule(
        DataConfig(train_shards=str(missing), languages=LANGS, batch_size=4), tokenizer=tokenizer
    )
    with pytest.raises(FileNotFoundError, match=r"--data\.train_shards"):
        dm.setup("fit")


# --------------------------------------------------------------------------- batches from worker processes


def _same_batch(a: Batch, b: Batch) -> None:
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, torch.Tensor):
            assert other.dtype == value.dtype and torch.equal(other, value), name
        else:
            assert other == value, name


def test_worker_batches_equal_in_process_batches(shards, tokenizer):
    """Batches cross from a DataLoader worker by value (``Batch.__reduce__``), not through shared memory: the
    training process gets the same tensors, dtypes and fields as without workers."""
    cfg = StreamConfig(batch_size=6, languages=LANGS, shuffle_buffer=8)
    # one worker plans the same slots as none (two would split the shards differently)
    local = read_epoch(MultiWayStream(shards, tokenizer, cfg, num_workers=0))
    remote = read_epoch(MultiWayStream(shards, tokenizer, cfg, num_workers=1))
    assert len(local) == len(remote) > 3
    for a, b in zip(local, remote):
        _same_batch(replace(a, origin=b.origin), b)


def test_batch_pickles_by_value_with_every_dtype():
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's shared-memory reducers, as a DataLoader does)

    batch = Batch(
        input_ids=torch.arange(12).reshape(3, 4), attention_mask=torch.ones(3, 4, dtype=torch.long),
        row_ids=torch.tensor([0, 0, 1]), lang_ids=torch.tensor([0, 1, 0]), languages=("de", "en"), pivot_lang_id=1,
        row_keys=("a", "b"), text_ids=torch.tensor([-(2**63), 5, 2**63 - 1]), texts=("x", "y", "z"),
        teacher=torch.randn(2, 3).to(torch.bfloat16),
    )
    for half in (torch.bfloat16, torch.float16):
        b = replace(batch, teacher=batch.teacher.to(half))
        wire = bytes(ForkingPickler.dumps(b))
        _same_batch(b, pickle.loads(wire))
        # no shared-memory handles (torch's reducer) except for bfloat16, which numpy lacks
        assert (b"rebuild_storage" in wire) == (half == torch.bfloat16)
    assert len(pickle.dumps(replace(batch, teacher=None))) < 2000  # by value: a few hundred bytes, no handles
