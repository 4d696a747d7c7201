"""``AlignmentDataModule``: the Lightning face of :mod:`alignment.data.stream`, for fit and validate.

What Lightning gets:
    * ``train_dataloader`` / ``val_dataloader``: :class:`StreamLoader` objects over
      :class:`~alignment.data.stream.MultiWayStream` (batching happens in the
      workers, so ``batch_size=None``). Each loader sets the stream's epoch from
      the trainer right before its workers start, so shuffling changes per
      epoch with no call from the training module.
    * ``state_dict`` / ``load_state_dict`` (Lightning stores them in checkpoints):
      the epoch and how many training batches of it were consumed, so a resumed
      run replays (finite mode) or reseeds (resampled mode) the rest of the epoch.
    * ``on_before_batch_transfer``: counts consumed training batches and
      aggregates the skip counters the workers attach to every batch. If the
      LightningModule overrides this hook too, Lightning runs only the
      datamodule's (and warns): put module-side batch logic in
      ``on_after_batch_transfer``, or call :meth:`AlignmentDataModule.observe_batch`
      yourself when feeding batches without Lightning.

Skip counters: every worker counts skipped samples by reason and attaches its
cumulative counts to each Batch (``Batch.skip_counts``, keyed by
``Batch.origin = (epoch, worker)``); :meth:`AlignmentDataModule.skip_counts`
sums the latest counts of every worker into per-rank run totals. Sum over ranks
when logging (``self.log(..., reduce_fx="sum", sync_dist=True)``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from alignment.batch import Batch
from alignment.data.config import LANGUAGE_POLICIES, LanguagePolicy, StreamConfig, flag
from alignment.data.manifest import manifest_languages
from alignment.data.pins import sidecar_pins
from alignment.data.plan import ShardRef
from alignment.data.stream import MultiWayStream

TRAIN_SPLIT = "train"
VAL_SPLIT = "validation"
TEST_SPLIT = "test"
ShardSpec = str | list[str]


@dataclass
class DataConfig(StreamConfig):
    """Training and validation data: shards, workers, tokenizer, plus everything in :class:`StreamConfig`
    (``align fit --data.x``; ``align fit --data.help DataConfig`` lists every field with its documentation)."""

    train_shards: ShardSpec | None = None
    """Training shards: a manifest.json or the folder holding one (its `train` split, with row counts), a glob,
    a brace pattern, a tar path, or a list of those (row counts then come from scanning tar headers)."""
    val_shards: ShardSpec | None = None
    """Validation shards, same forms (a manifest's `validation` split); none: no validation."""
    test_shards: ShardSpec | None = None
    """Test shards for `align test` (a manifest's `test` split); none: the test split of the `val_shards`
    manifest."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: read in the training process). Finite mode needs at least
    ranks x workers shards."""
    multiprocessing_context: Literal["fork", "spawn"] = "fork"
    """How workers start: `fork` (fast; copies the parent) or `spawn` (fresh interpreter; pays imports and
    tokenizer unpickling at every epoch start)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    pin_memory: bool = False
    """Pin batches in page-locked memory for faster host-to-GPU copies (GPU runs)."""
    tokenizer: str | None = None
    """Tokenizer name or local path for `AutoTokenizer.from_pretrained` (the model's; unless one is handed in)."""
    val_language_policy: LanguagePolicy = "all"
    """Language policy of the validation stream (validation never resamples and never shuffles)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_workers < 0:
            raise ValueError(f"{flag('num_workers')} must be >= 0, got {self.num_workers}")
        if self.multiprocessing_context not in ("fork", "spawn"):
            raise ValueError(
                f"{flag('multiprocessing_context')} must be fork or spawn, got {self.multiprocessing_context!r}"
            )
        if self.prefetch_factor < 1:
            raise ValueError(f"{flag('prefetch_factor')} must be >= 1, got {self.prefetch_factor}")
        if self.val_language_policy not in LANGUAGE_POLICIES:
            raise ValueError(
                f"{flag('val_language_policy')} must be one of {', '.join(LANGUAGE_POLICIES)}, "
                f"got {self.val_language_policy!r}"
            )
        for name in ("train_shards", "val_shards", "test_shards"):
            spec = getattr(self, name)
            if spec is not None and not isinstance(spec, (str, list, tuple)):
                raise ValueError(f"{flag(name)} must be a path, pattern or list of paths, got {spec!r}")

    def validation_stream_config(self) -> "DataConfig":
        """This config as the validation stream uses it: its language policy, finite."""
        return replace(
            self, language_policy=self.val_language_policy, resampled=False, samples_per_epoch=None, steps_per_epoch=None
        )


# --------------------------------------------------------------------------- shard specs


def resolve_shard_spec(spec: ShardSpec, split: str, field: str = "train_shards") -> list[ShardRef]:
    """The shards of a spec (manifest, folder, glob, brace pattern, path or list), via ``resolve_shards``.

    Manifests give row counts; other specs leave them unknown and the finite
    stream counts them from the tar headers (see ``count_shard_rows``).

    Raises:
        FileNotFoundError: nothing matches; the message names the flag (``field``) and the path.
        ValueError: an invalid manifest, a URL or ``pipe:`` spec, a shard linking out of its folder (names the flag).
    """
    from alignment.data.manifest import resolve_shards

    try:
        infos = resolve_shards(spec, split=split)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{flag(field)}: {err}") from err
    except ValueError as err:  # ManifestError too: a broken manifest, a URL, a shard linking out of its folder
        raise type(err)(f"{flag(field)}: {err}") from err
    return [ShardRef(str(info.url), info.rows) for info in infos]


# --------------------------------------------------------------------------- loader and counters


class StreamLoader(DataLoader):
    """A ``DataLoader`` over a :class:`MultiWayStream` that lets its owner set the epoch before workers start.

    ``before_iter(stream)`` runs in the main process each time an iterator is
    created, i.e. right before (non-persistent) workers receive their copy of the
    stream: the only moment an epoch or resume position can reach them.
    """

    def __init__(self, stream: MultiWayStream, *, before_iter: Callable[[MultiWayStream], None], **kwargs: Any):
        super().__init__(stream, batch_size=None, **kwargs)
        self._before_iter = before_iter

    def __iter__(self):
        self._before_iter(self.dataset)
        return super().__iter__()


class ResumableStreamLoader(StreamLoader):
    """The training loader, with Lightning's resumable-loader interface (``state_dict`` / ``load_state_dict``).

    The position lives in the datamodule (only it sees which batches were
    consumed, not merely prefetched); this delegates to it, so Lightning also
    restores the position when the loaders are handed to ``fit`` without the
    datamodule, and knows the loader resumes mid-epoch.
    """

    def __init__(
        self,
        stream: MultiWayStream,
        *,
        before_iter: Callable[[MultiWayStream], None],
        get_state: Callable[[], dict[str, Any]],
        set_state: Callable[[dict[str, Any]], None],
        **kwargs: Any,
    ):
        super().__init__(stream, before_iter=before_iter, **kwargs)
        self._get_state, self._set_state = get_state, set_state

    def state_dict(self) -> dict[str, Any]:
        return self._get_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._set_state(state_dict)


class SkipCounts:
    """Run totals of skipped samples from the per-worker cumulative counts that batches carry."""

    def __init__(self) -> None:
        self._done: dict[str, int] = {}
        self._latest: dict[tuple[int, int], dict[str, int]] = {}

    def observe(self, batch: Batch) -> None:
        self._latest[batch.origin] = batch.skip_counts

    def totals(self, before_epoch: int | None = None) -> dict[str, int]:
        """Totals, or only those of epochs before ``before_epoch``."""
        out = dict(self._done)
        for (epoch, _), counts in self._latest.items():
            if before_epoch is None or epoch < before_epoch:
                for reason, n in counts.items():
                    out[reason] = out.get(reason, 0) + n
        return out

    def restart(self, totals: dict[str, int] | None = None) -> None:
        """Fold everything into the totals (or replace them) and forget per-worker state."""
        self._done = dict(totals) if totals is not None else self.totals()
        self._latest = {}


# --------------------------------------------------------------------------- the datamodule


class AlignmentDataModule(LightningDataModule):
    """Multi-way parallel shards as streamed, tokenised batches for ``Trainer.fit`` and ``Trainer.validate``.

    Args:
        config: the data config (``--data.*``; ``align fit --data.help DataConfig`` lists
            every field with its documentation).
        tokenizer: a tokenizer object; default: ``AutoTokenizer.from_pretrained(config.tokenizer)``.

    Streams are built in :meth:`setup`, after the process group exists, so each
    captures its rank. Impossible configurations (``k`` above the languages
    present, fewer shards than ranks x workers in finite mode) raise there,
    before training starts.
    """

    def __init__(self, config: DataConfig | None = None, tokenizer: Any = None) -> None:
        super().__init__()
        self.config = config if config is not None else DataConfig()
        self._tokenizer = tokenizer
        self._token_identity: dict | None = None  # hashes the whole vocabulary: once, not per split
        self.train_stream: MultiWayStream | None = None
        self.val_stream: MultiWayStream | None = None
        self.test_stream: MultiWayStream | None = None
        self._epoch = 0
        self._pending_resume: tuple[int, int] | None = None
        self._train_epoch = 0
        self._train_consumed = 0
        self._skips = {"train": SkipCounts(), "val": SkipCounts()}
        self.sidecar_pins: dict[str, dict[str, Any]] | None = None
        """The sidecars the training stream reads (:func:`alignment.data.pins.sidecar_pins`); None before setup."""

    # -- setup

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.config.tokenizer is None:
                raise ValueError(f"set {flag('tokenizer')} (a tokenizer name or path) or hand in a tokenizer object")
            from alignment.loading import load_tokenizer

            self._tokenizer = load_tokenizer(self.config.tokenizer, flag("tokenizer"))  # a missing path is named
        return self._tokenizer

    @property
    def languages(self) -> tuple[str, ...]:
        """The language vocabulary (language ids index it); available after :meth:`setup`."""
        stream = self.train_stream or self.val_stream
        if stream is None:
            raise RuntimeError("call setup() first")
        return stream.languages

    def setup(self, stage: str | None = None) -> None:
        cfg = self.config
        fitting = stage in (None, "fit")
        if fitting and cfg.train_shards is None:
            raise ValueError(f"{flag('train_shards')} is required to fit")
        # Resolve the shards before anything else reads them, so a wrong path is reported as one.
        train_shards = resolve_shard_spec(cfg.train_shards, TRAIN_SPLIT) if fitting and self.train_stream is None else None
        vocabulary = self._vocabulary()
        if train_shards is not None:
            train_shards = self._pretokenised(train_shards, cfg.train_shards, TRAIN_SPLIT, "train_shards")
            if cfg.hard_negatives:
                from lightning.pytorch.utilities import rank_zero_info

                from alignment.data.hard_negatives import attach_negatives

                train_shards, line = attach_negatives(train_shards, cfg.train_shards, TRAIN_SPLIT, cfg.hard_negatives)
                rank_zero_info(line)
            self.train_stream = MultiWayStream(
                train_shards, self.tokenizer, cfg, languages=vocabulary, num_workers=cfg.num_workers, shuffle=True
            )
            self.sidecar_pins = sidecar_pins(train_shards, cfg.train_shards, TRAIN_SPLIT)
        if stage in (None, "fit", "validate") and cfg.val_shards is not None and self.val_stream is None:
            self.val_stream = self._validation_stream(vocabulary)
        if stage == "test" and self.test_stream is None:
            spec = cfg.test_shards if cfg.test_shards is not None else cfg.val_shards
            if spec is None:
                raise ValueError(f"align test needs {flag('test_shards')} (or {flag('val_shards')}: the test split of "
                                 "its manifest)")
            field = "test_shards" if cfg.test_shards is not None else "val_shards"
            self.test_stream = self._validation_stream(vocabulary, spec=spec, split=TEST_SPLIT, field=field)

    def attach_teacher(self, want: dict[str, Any]) -> str:
        """Read the stored teacher embeddings matching ``want`` with every training row (``Batch.teacher``;
        :func:`alignment.data.teacher.attach_teacher`), after :meth:`setup`; returns the line for the log.

        Raises:
            ValueError: none match (each difference named with its flag), or ``--data.hard_negatives`` is on
                (a negative's row is read from another shard's sidecar, without its stored vector).
        """
        from alignment.data.teacher import attach_teacher

        if self.train_stream is None:
            raise RuntimeError("call setup('fit') first")
        if self.config.hard_negatives:
            raise ValueError(f"{flag('hard_negatives')} {self.config.hard_negatives} adds rows that carry no stored "
                             "teacher embedding; set it to 0 or run the teacher per step")
        shards, line = attach_teacher(self.train_stream.shards, self.config.train_shards, TRAIN_SPLIT,
                                      {**want, "pivot": self.config.pivot})
        self.train_stream.shards = shards  # the epoch plan reads url and rows only: unchanged
        self.sidecar_pins = sidecar_pins(shards, self.config.train_shards, TRAIN_SPLIT)
        return line

    def _pretokenised(self, shards: list[ShardRef], spec: ShardSpec, split: str, field: str) -> list[ShardRef]:
        """The shards with their pre-tokenised sidecars when the manifest has ids of the configured tokenizer,
        max length and prefix (said once per split in the log); else as they are, with the reason in the log."""
        from lightning.pytorch.utilities import rank_zero_info

        from alignment.data.manifest import MANIFEST_NAME, load_manifest, manifest_file
        from alignment.data.tokens import match_tokens, sidecar_paths, tokenizer_identity, tokenizer_name

        if not isinstance(spec, str) or not (Path(spec).suffix == ".json" or (Path(spec) / MANIFEST_NAME).is_file()):
            return shards  # no manifest, no sidecars
        file = manifest_file(spec)
        cfg = self.config
        if self._token_identity is None:
            self._token_identity = tokenizer_identity(self.tokenizer, max_length=cfg.max_length,
                                                      text_prefix=cfg.text_prefix)
        key, record, why = match_tokens(load_manifest(file), self._token_identity)
        name = tokenizer_name(self.tokenizer)
        if key is None:
            rank_zero_info(f"data: tokenising {flag(field)} ({split}) with {name} in the loader: {why}")
            return shards
        paths = sidecar_paths(file, split, key)
        covered = [replace(ref, tokens=paths.get(ref.url)) for ref in shards]
        have = sum(ref.tokens is not None for ref in covered)
        if not have:
            rank_zero_info(f"data: tokenising {flag(field)} ({split}) with {name} in the loader: entry {key} of "
                           f"{file} has no token files for the {split} split")
            return shards
        rank_zero_info(f"data: pre-tokenised ids for {name} (key {key}) from {file} ({split}: {have} of "
                       f"{len(covered)} shards)")
        return covered

    def _vocabulary(self) -> list[str]:
        if self.config.languages is not None:
            return list(self.config.languages)
        for spec in (self.config.train_shards, self.config.val_shards, self.config.test_shards):
            found = manifest_languages(spec)
            if found:
                return found
        raise ValueError(
            f"no language vocabulary: set {flag('languages')} (the shards were not given through a manifest)"
        )

    def _validation_stream(self, vocabulary: Sequence[str] | None, *, spec: ShardSpec | None = None,
                           split: str = VAL_SPLIT, field: str = "val_shards") -> MultiWayStream:
        from alignment import distributed

        cfg = self.config.validation_stream_config()
        shards = resolve_shard_spec(cfg.val_shards if spec is None else spec, split, field=field)
        world = distributed.get_world_size()
        if len(shards) < world:
            raise ValueError(
                f"{flag(field)} has {len(shards)} shard(s) of its {split} split for {world} ranks: "
                "each rank needs one; "
                f"write the {split} split with smaller shards"
            )
        shards = self._pretokenised(shards, cfg.val_shards if spec is None else spec, split, field)
        # Validation sets are small: use fewer workers rather than refuse (one shard per reader at least).
        workers = min(cfg.num_workers, len(shards) // world)
        return MultiWayStream(shards, self.tokenizer, cfg, languages=vocabulary, num_workers=workers, shuffle=False)

    # -- loaders

    def _loader_kwargs(self, stream: MultiWayStream) -> dict[str, Any]:
        cfg = self.config
        kwargs: dict[str, Any] = {"num_workers": stream.num_workers, "pin_memory": cfg.pin_memory}
        if stream.num_workers:
            # Non-persistent on purpose: a fresh copy of the stream per epoch is how the epoch reaches workers.
            kwargs.update(
                multiprocessing_context=cfg.multiprocessing_context,
                prefetch_factor=cfg.prefetch_factor,
                persistent_workers=False,
            )
        return kwargs

    def train_dataloader(self) -> ResumableStreamLoader:
        if self.train_stream is None:
            raise RuntimeError(f"no training stream: call setup('fit') with {flag('train_shards')} set")
        return ResumableStreamLoader(
            self.train_stream,
            before_iter=self._before_train_iter,
            get_state=self.state_dict,
            set_state=self.load_state_dict,
            **self._loader_kwargs(self.train_stream),
        )

    def val_dataloader(self) -> StreamLoader | list:
        if self.val_stream is None:
            return []
        return StreamLoader(self.val_stream, before_iter=self._before_val_iter, **self._loader_kwargs(self.val_stream))

    def test_dataloader(self) -> StreamLoader:
        if self.test_stream is None:
            raise RuntimeError("no test stream: call setup('test')")
        stream = self.test_stream
        return StreamLoader(stream, before_iter=self._before_val_iter, **self._loader_kwargs(stream))

    def _current_epoch(self) -> int:
        """The epoch the trainer is about to run (or :meth:`set_epoch`'s without a trainer).

        Lightning's own choice for samplers (``FitLoop.on_advance_start``): the
        number of processed epochs. ``trainer.current_epoch`` lags by one while a
        run restored from an end-of-epoch checkpoint creates its first iterator.
        """
        trainer = self.trainer
        return trainer.fit_loop.epoch_progress.current.processed if trainer is not None else self._epoch

    def _before_train_iter(self, stream: MultiWayStream) -> None:
        epoch, start = self._current_epoch(), 0
        if self._pending_resume is not None and self._pending_resume[0] == epoch:
            start = min(self._pending_resume[1], len(stream))
        self._pending_resume = None
        stream.set_epoch(epoch, start)
        self._train_epoch, self._train_consumed = epoch, start

    def _before_val_iter(self, stream: MultiWayStream) -> None:
        stream.set_epoch(0)
        self._skips["val"].restart({})

    # -- epochs, resume, counters

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next training iterator produces, for loops without a Lightning trainer.

        With a trainer attached, ``trainer.current_epoch`` is used instead.
        """
        self._epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        """Make the next training iterator of ``epoch`` start after its first ``batches_done`` batches."""
        self._pending_resume = (epoch, batches_done)

    def observe_batch(self, batch: Batch, split: str = "train") -> None:
        """Record a batch that is about to be used: its worker's skip counts and, for training, the position."""
        if isinstance(batch, Batch):
            self._skips[split].observe(batch)
            if split == "train":
                self._train_consumed += 1

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        training = trainer is None or (trainer.training and not trainer.sanity_checking)
        self.observe_batch(batch, "train" if training else "val")
        return batch

    def skip_counts(self, split: str = "train") -> dict[str, int]:
        """Skipped samples by reason on this rank: training run totals, or the latest validation pass."""
        return self._skips[split].totals()

    def state_dict(self) -> dict[str, Any]:
        """Resume state: epoch, training batches consumed in it, seed, and skip totals of finished epochs.

        Skips of an unfinished finite epoch are left out: a resumed finite epoch
        re-reads (and re-counts) its rows from the start; a resampled one does not.
        """
        stream = self.train_stream
        finished = stream is not None and self._train_consumed >= len(stream)
        before = None if finished or self.config.resampled else self._train_epoch
        return {
            "epoch": self._train_epoch,
            "batches_done": self._train_consumed,
            "seed": self.config.seed,
            "resampled": self.config.resampled,
            "skip_counts": self._skips["train"].totals(before_epoch=before),
            "position": self._position_settings(),
        }

    def _position_settings(self) -> dict[str, Any]:
        """What ``batches_done`` means: a position is only valid with the same batch size, ranks and languages."""
        trainer = getattr(self, "trainer", None)
        return {
            "batch_size": self.config.batch_size,
            "world_size": int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1,
            "language_policy": self.config.language_policy,
            "languages": list(self.config.languages) if self.config.languages is not None else None,
        }

    def _check_position(self, saved: dict[str, Any] | None) -> None:
        if not saved:
            return  # a checkpoint of an older version
        now = self._position_settings()
        names = {"batch_size": flag("batch_size"), "world_size": "the number of ranks (--trainer.devices x "
                 "--trainer.num_nodes)", "language_policy": flag("language_policy"), "languages": flag("languages")}
        for key, name in names.items():
            if key in saved and saved[key] != now[key]:
                raise ValueError(
                    f"resuming with {name} = {now[key]!r}, but the checkpoint was trained with {saved[key]!r}: its "
                    "saved data position (epoch, batches done) would point at the wrong rows. "
                    f"Resume with the checkpoint's value, or start a new run (no --ckpt_path) to change it"
                )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_position(state_dict.get("position"))
        if state_dict.get("seed") != self.config.seed or state_dict.get("resampled") != self.config.resampled:
            warnings.warn(
                f"resuming with {flag('seed')}={self.config.seed}, {flag('resampled')}={self.config.resampled} "
                f"but the checkpoint used {state_dict.get('seed')}, {state_dict.get('resampled')}: "
                "the rest of the interrupted epoch will not match the original run",
                stacklevel=2,
            )
        self.resume(int(state_dict["epoch"]), int(state_dict["batches_done"]))
        self._skips["train"].restart(dict(state_dict.get("skip_counts", {})))
