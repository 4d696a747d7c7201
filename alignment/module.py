"""``AlignmentModule``: one training step of multi-way alignment, as a LightningModule.

The step (``../shared/docs/architecture.md``)::

    training_step(batch)                         this file
      -> encode_step(DualEncoder, batch)         alignment/packing.py: one packed sequence (varlen attention,
                                     (n, D)      --model.step.unpadded) or alignment/encode.py: sentences sorted by
                                                 length, chunks under --model.step.token_budget, back in batch order
      -> gather_candidates(...)      (M, D)      alignment/distributed.py, with gradients
      -> MultiWayContrastiveLoss     dict        alignment/losses.py, + drift_loss
      -> Objectives.add_terms        dict        alignment/objectives/: adversarial, neighbourhood, distill, matryoshka
      -> sum of *_loss terms, logged with every metric

With ``--model.gradcache.chunk_size > 0`` the step runs GradCache under
manual optimisation (``alignment/gradcache.py``). The module knows no ranks:
collectives live in ``alignment.distributed`` and Lightning's strategy;
strategy-specific code in ``alignment.strategies``.

Collective budget of one optimiser step (``tests/distributed/test_module_ddp.py`` counts them)::

    gather_candidates        3 all-gathers (sizes, embeddings, ids) + 1 reduce-scatter in backward: the loss
    objectives               --model.neighbourhood.weight > 0: 1 all-gather of the reference's embeddings (none else)
    the step guard           1 all-reduce of a few floats (_guard_and_log): NaN/inf check, preemption flag, global loss;
                             on logging steps the same all-reduce also carries every logged term and counter
                             (train/padding_share of the length-grouped encoder included)
    gradients                DDP's bucketed all-reduces (ZeRO: its reduce-scatters/all-gathers);
                             GradCache path: 1 flat all-reduce of all gradients instead (DDP's sync is off)
    DDP buffers              none: their per-forward broadcast is off (strategies.ddp_defaults)
    Lightning                1 broadcast of one int before each batch (its SIGTERM check, world > 1)
    callbacks                none per step; ThroughputLogger reads the device once per logging step,
                             PreemptionCheckpoint reads the step guard's agreed flag

Nothing else per step: no ``sync_dist`` logging, no separate boolean decisions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import grad_norm
from torch import Tensor

from alignment import adapters, distributed, preemption, strategies
from alignment.batch import SKIP_REASONS, Batch
from alignment.encode import PaddingStats
from alignment.gradcache import GradCache, GradCacheConfig
from alignment.losses import LossConfig, MultiWayContrastiveLoss, drift_loss, total_loss
from alignment.model import DualEncoder, ModelConfig, max_positions, transformer_layers
from alignment.objectives import AdversarialConfig, DistillConfig, MatryoshkaConfig, NeighbourhoodConfig, Objectives
from alignment.optim import OptimConfig, build_optimizer, build_scheduler
from alignment.packing import UNPADDED, Unpadded, check_unpadded, encode_step
from alignment.runs import CKPT_RUN, check_resume, describe_run

EMPTY_STEP = "empty_step_loss"
"""Loss key of a step where every rank's batch was empty (a zero connected to the graph); such steps are skipped."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN or infinite loss."""


@dataclass
class StepConfig:
    """Guards and evaluation of the training step (``--model.step.*``)."""

    max_nonfinite_steps: int = 10
    """Consecutive NaN/inf-loss steps (skipped and counted) before the run stops with a checkpoint."""
    log_grad_norm: bool = True
    """Log the total gradient 2-norm before each optimiser step (one reduction over all gradients)."""
    eval_max_sentences: int = 20000
    """Cap on held-out sentences kept for the evaluation hook per validation pass (memory: N x D floats)."""
    token_budget: int | None = 8192
    """Length-grouped encoding (``alignment/encode.py``): the step's sentences are sorted by length and encoded
    in chunks of at most this many token positions (rows x the chunk's longest sentence; it bounds a forward's
    activation memory), each padded only to its own longest sentence; None or 0 = one forward padded to the
    batch's longest sentence. Same embeddings and gradients; left-padded batches take the one padded forward."""
    unpadded: Unpadded = "auto"
    """Packed encoding (``alignment/packing.py``): all the step's real tokens in one sequence, attention cut per
    sentence by a variable-length kernel (``--model.encoder.attn_implementation sdpa_varlen`` or
    ``flash_attention_2``): no padding at all. ``auto`` packs where such a kernel runs fast (CUDA) and otherwise
    takes the length-grouped path, saying once which and why; ``on`` packs wherever the kernel can (the exact
    quadratic reference on CPU) and refuses where it cannot; ``off`` never packs. Same embeddings and gradients."""

    def __post_init__(self) -> None:
        if self.unpadded not in UNPADDED:
            raise ValueError(f"--model.step.unpadded must be one of {', '.join(UNPADDED)}, got {self.unpadded!r}")
        if self.token_budget is not None and self.token_budget < 0:
            raise ValueError(f"--model.step.token_budget must be >= 0 (0 or null: one padded forward), "
                             f"got {self.token_budget}")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"--model.step.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        if self.eval_max_sentences < 2:
            raise ValueError(f"--model.step.eval_max_sentences must be >= 2, got {self.eval_max_sentences}")


def _build_encoder(cfg: ModelConfig) -> DualEncoder:
    """The encoder of ``cfg``; a name or folder that does not load is reported with its flag."""
    try:
        return DualEncoder.from_model_config(cfg)
    except OSError as exc:  # transformers: unknown hub name, offline cache miss, folder without config.json
        raise ValueError(
            f"--model.encoder.name_or_path {cfg.name_or_path!r} does not load as a Hugging Face model "
            f"(a hub name available offline, or a local folder with config.json and weights): {exc}"
        ) from exc


def check_global_batch(rows_per_rank: int, world_size: int) -> None:
    """Refuse a global batch with a single row: every candidate would be a positive, the loss has no negatives."""
    if rows_per_rank * world_size < 2:
        raise ValueError(
            f"--data.batch_size {rows_per_rank} x {world_size} rank(s) is a global batch of "
            f"{rows_per_rank * world_size} row: contrastive training needs other rows as negatives; "
            "use --data.batch_size >= 2"
        )


class AlignmentModule(LightningModule):
    """Contrastive multi-way alignment of a multilingual encoder.

    Args:
        encoder: which backbone and how to embed (``--model.encoder.*``).
        loss: objective, temperature, margin, drift (``--model.loss.*``).
        optim: AdamW + schedule (``--model.optim.*``).
        gradcache: chunked encoding for global batches beyond memory (``--model.gradcache.*``).
        step: NaN guard and evaluation settings (``--model.step.*``).
        adversarial, neighbourhood, distill, matryoshka: extra objectives (``alignment/objectives/``):
            language-adversarial discriminator, within-language neighbourhood preservation, teacher
            distillation, nested-prefix (Matryoshka) contrastive terms; all off by default.

    The encoder is built here, in ``__init__``, with its pretrained weights, so
    DeepSpeed ZeRO-3 partitions already-loaded tensors at ``deepspeed.initialize``
    (building it inside ``configure_model``'s ``zero.Init`` would let
    ``from_pretrained`` copy weights into size-0 partitions). The cost is one
    full copy of the weights per rank during start-up.
    """

    def __init__(
        self,
        encoder: ModelConfig,
        loss: LossConfig = LossConfig(),
        optim: OptimConfig = OptimConfig(),
        gradcache: GradCacheConfig = GradCacheConfig(),
        step: StepConfig = StepConfig(),
        adversarial: AdversarialConfig = AdversarialConfig(),
        neighbourhood: NeighbourhoodConfig = NeighbourhoodConfig(),
        distill: DistillConfig = DistillConfig(),
        matryoshka: MatryoshkaConfig = MatryoshkaConfig(),
    ) -> None:
        super().__init__()
        self.encoder_config, self.loss_config, self.optim_config = encoder, loss, optim
        self.gradcache_config, self.step_config = gradcache, step
        self.save_hyperparameters(
            {"encoder": asdict(encoder), "loss": asdict(loss), "optim": asdict(optim),
             "gradcache": asdict(gradcache), "step": asdict(step), "adversarial": asdict(adversarial),
             "neighbourhood": asdict(neighbourhood), "distill": asdict(distill), "matryoshka": asdict(matryoshka)}
        )
        # from_pretrained returns eval mode and Lightning keeps submodules' modes:
        # switch dropout on for fine-tuning explicitly.
        self.encoder = _build_encoder(encoder).train()
        check_unpadded(self.encoder, step.unpadded)  # --model.step.unpadded on with a kernel that cannot pack
        self.strict_loading = not encoder.adapter.checkpoint_adapter_only  # such checkpoints lack the frozen base
        self.loss_fn = MultiWayContrastiveLoss(loss)
        self.objectives = Objectives(adversarial, neighbourhood, distill, matryoshka,
                                     embedding_dim=self.encoder.embedding_dim)  # fmt: skip
        self.objectives.record_in(self.encoder.card_extra)  # the export's alignment_encoder.json: Matryoshka dims
        # The drift reference is deliberately not a registered submodule: it is
        # never trained, never checkpointed and never handed to DDP/DeepSpeed.
        need_reference = loss.drift_weight > 0 or self.objectives.needs_reference
        object.__setattr__(self, "_reference", self.encoder.frozen_copy() if need_reference else None)
        self.automatic_optimization = not gradcache.enabled
        self._gradcache = (GradCache(self._encode, self._loss_terms, gradcache.chunk_size,
                                     token_budget=step.token_budget) if gradcache.enabled else None)  # fmt: skip
        self._padding = PaddingStats()
        self.nonfinite_steps = 0
        self.nonfinite_total = 0
        self.empty_steps_total = 0
        self._step_skipped = False
        self.preemption_agreed = False
        """Whether any rank received the preemption signal, as of this step's guard (``PreemptionCheckpoint``)."""
        self._val_parts: list[tuple[Tensor, Tensor, Tensor]] = []
        self._val_rows = 0
        self._val_languages: tuple[str, ...] = ()
        self._val_pivot = "en"
        self.last_eval: dict[str, float] = {}

    # ------------------------------------------------------------------ the step

    def _encode(self, batch: Batch) -> Tensor:
        """``(n, D)`` embeddings; an empty local batch still touches every parameter.

        A rank whose batch is empty (the last batches of a finite epoch, after
        corrupt samples were skipped) must still produce gradients for every
        parameter, or DDP's all-reduce would wait for it forever: it encodes one
        padding sentence and keeps zero rows of it.
        """
        if batch.num_sentences > 0:
            return encode_step(self.encoder, batch, self.step_config.token_budget, self.step_config.unpadded,
                               self._padding)
        pad = torch.zeros(1, 2, dtype=batch.input_ids.dtype, device=batch.input_ids.device)
        return self.encoder.encode(pad, torch.ones_like(pad))[:0]  # (0, D), connected to the graph

    def _loss_terms(self, emb: Tensor, batch: Batch) -> dict[str, Tensor]:
        texts = batch.text_ids if self.loss_config.mask_duplicates != "off" else None  # alignment.negatives
        candidates = distributed.gather_candidates(emb, batch.row_ids, batch.lang_ids, text_ids=texts)  # (M, D)
        if candidates.num_sentences == 0:
            # Every rank's batch is empty (rows skipped in a finite epoch): nothing to score. Every rank sees the
            # same gathered sizes, so all skip this step together (see _skip_empty).
            return {EMPTY_STEP: emb.sum() * 0.0, "global_rows": emb.new_zeros(())}
        # metrics (retrieval_acc, cosines, temperature) reach the loggers on logging steps only: skip them otherwise
        out = self.loss_fn(emb, candidates, pivot_lang_id=batch.pivot_lang_id, metrics=self._is_logging_step())
        out["global_rows"] = emb.new_tensor(float(candidates.num_rows))  # rows of all ranks: the real global batch
        ref = None
        if self._reference is not None:
            with torch.no_grad():
                step = self.step_config
                ref = (encode_step(self._reference, batch, step.token_budget, step.unpadded)
                       if batch.num_sentences else emb.detach())  # (n, D)
        if self.loss_config.drift_weight > 0:
            out.update(drift_loss(emb, ref, self.loss_config.drift_weight, self.loss_config.drift_kind, candidates))
        self.objectives.add_terms(out, emb, batch, candidates, self.loss_fn, reference=ref, step=self.global_step)
        return out

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        self._step_skipped = False
        self._padding = PaddingStats()  # filled by _encode: train/padding_share
        if self._gradcache is not None:
            return self._gradcache_step(batch)
        out = self._loss_terms(self._encode(batch), batch)
        if self._skip_empty(out):
            return None  # no backward, no optimiser update, on every rank
        loss = total_loss(out)
        if not self._guard_and_log(loss, out, batch):
            self._step_skipped = True  # on_before_optimizer_step logs no norm for it
            return None  # Lightning skips backward and the optimiser step on every rank
        return loss

    def _gradcache_step(self, batch: Batch) -> None:
        """Manual optimisation: GradCache fills the gradients, then one optimiser step.

        DDP's own gradient sync is switched off for this path (see
        :meth:`on_train_start`): GradCache runs several backward passes per
        step, which DDP's reducer does not allow, so gradients are averaged
        here in one flat all-reduce instead.
        """
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        optimizer.zero_grad(set_to_none=True)
        out = self._gradcache.step(batch)
        distributed.average_gradients_([p for p in self.encoder.parameters() if p.requires_grad])
        if self._skip_empty(out):
            optimizer.zero_grad(set_to_none=True)
            return None
        loss = total_loss(out)
        if not self._guard_and_log(loss, out, batch):
            optimizer.zero_grad(set_to_none=True)
            self._log_skipped_grad_norm()
            return None
        self._clip(optimizer)
        self._log_grad_norm()
        optimizer.step()
        scheduler.step()
        return None

    def _skip_empty(self, out: dict[str, Tensor]) -> bool:
        """Whether every rank's batch was empty; such a step is skipped and counted (``train/empty_steps``).

        Every rank sees the same gathered sizes, so all return here together, before the step's collective."""
        if EMPTY_STEP not in out:
            return False
        self.empty_steps_total += 1
        self._step_skipped = True
        if not self.automatic_optimization:
            self._log_skipped_grad_norm()
        if self._is_logging_step():
            self.log("train/empty_steps", float(self.empty_steps_total), on_step=True, on_epoch=False, batch_size=1)
        return True

    def _guard_and_log(self, loss: Tensor, out: dict[str, Tensor], batch: Batch) -> bool:
        """The step's one small collective: agree on finiteness and preemption, log global values.

        One all-reduce of a few floats (and one device-to-host sync): the
        count of ranks whose loss is not finite (every rank must skip the same
        steps, or the next collective would pair up different steps), the
        count of ranks that received the preemption signal (read by
        ``PreemptionCheckpoint`` from :attr:`preemption_agreed`), and the
        global loss, the mean over ranks of ``L_r`` (``alignment.distributed``:
        the loss one process would compute over the whole global batch). On
        logging steps the same vector also carries every scalar term (mean over
        ranks) and the data skip counters (sum over ranks). Returns whether the
        loss is finite on every rank.
        """
        logging = self._is_logging_step()
        if logging:  # this rank's padding share of the encoder's token positions (mean over ranks when logged)
            # always a tensor: sum_and_mean orders tensors before floats, the same on every rank
            share = torch.as_tensor(self._padding.share(), dtype=torch.float64, device=loss.device)
            out = {**out, "padding_share": share}
        local_nonfinite = (~torch.isfinite(loss.detach())).to(torch.float64).reshape(1)
        means = {"loss": loss.detach().to(torch.float64)}
        sums = {"nonfinite_ranks": local_nonfinite, "preempt_ranks": float(preemption.requested())}
        if logging:
            means.update({k: v.detach().to(torch.float64) for k, v in out.items() if v.numel() == 1})
            counts = self._skip_counts()
            sums.update({f"skipped/{reason}": float(counts.get(reason, 0)) for reason in SKIP_REASONS})
        summed, meaned = distributed.sum_and_mean(sums, means, device=loss.device)  # the one collective
        finite = summed["nonfinite_ranks"] == 0
        self.preemption_agreed = summed["preempt_ranks"] > 0
        if finite:
            self.nonfinite_steps = 0
        else:
            self.nonfinite_steps += 1
            self.nonfinite_total += 1
        # Logged either way: Lightning re-logs a key's last value on steps that do not log it,
        # so a skipped step that logged nothing would show the previous step's loss.
        self._log_terms(meaned, summed, batch, logging)
        if not finite and self.nonfinite_steps >= self.step_config.max_nonfinite_steps:
            self._stop_on_nonfinite(batch)
        return finite

    def _skip_counts(self) -> dict[str, int]:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "skip_counts"):
            return datamodule.skip_counts("train")
        return {}

    def _stop_on_nonfinite(self, batch: Batch) -> None:
        path = None
        if self.trainer.default_root_dir:
            path = f"{self.trainer.default_root_dir}/nonfinite-step{self.global_step}.ckpt"
            self.trainer.save_checkpoint(path)
        raise NonFiniteLossError(
            f"{self.nonfinite_steps} consecutive steps had a NaN or infinite loss (global step {self.global_step}, "
            f"rows {list(batch.row_keys[:4])}...); checkpoint written to {path}. Lower --model.optim.lr, raise "
            "--model.loss.temperature, or check the data; --model.step.max_nonfinite_steps sets the limit."
        )

    def _log_terms(self, means: dict[str, float], sums: dict[str, float], batch: Batch, logging: bool) -> None:
        """Log the agreed global values (no ``sync_dist``: they are the same on every rank already)."""
        rows = max(batch.num_rows, 1)
        loss = means["loss"]
        if self.trainer.progress_bar_callback is not None:  # the bar's "loss" (each self.log is ~0.5 ms)
            self.log("loss", loss, prog_bar=True, logger=False, batch_size=rows)
        # Every step, so callbacks can monitor it (ModelCheckpoint, EarlyStopping read callback_metrics).
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=rows)
        if not logging:
            # Lightning hands loggers only the logging step's on_step values: logging the other terms on
            # every step costs about 1 ms of Python per key (measured on the tiny model) for values no
            # logger receives.
            return
        logged = {f"train/{k}": v for k, v in means.items() if k != "loss"}
        logged["train/rows"] = float(batch.num_rows)  # this rank's rows (train/global_rows: all ranks')
        logged["train/nonfinite_steps"] = float(self.nonfinite_total)  # cumulative: skipped steps so far
        logged["train/empty_steps"] = float(self.empty_steps_total)  # cumulative: steps without any row
        # Run totals summed over ranks; every rank logs every reason, zeros included.
        logged.update({f"data/{k}": v for k, v in sums.items() if k.startswith("skipped/")})
        self.log_dict(logged, on_step=True, on_epoch=False, prog_bar=False, batch_size=rows)

    def _is_logging_step(self) -> bool:
        """Whether this step's logs reach the loggers, by Lightning's own rule (``(step + 1) % every``); the
        same answer on every rank, since global_step is shared. Every step when no Trainer is attached."""
        every = max(int(getattr(self._trainer, "log_every_n_steps", 1) or 1), 1)
        return (self.global_step + 1) % every == 0

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.automatic_optimization:
            # Gradients are unscaled here (Lightning's precision plugins unscale before this hook).
            if not self._step_skipped:
                self._clip(optimizer)
            # logged from this hook either way: a key logged from two hooks would re-log the stale one
            self._log_skipped_grad_norm() if self._step_skipped else self._log_grad_norm()

    def _clip(self, optimizer) -> None:
        """``--model.optim.max_grad_norm``: clip the total gradient 2-norm (both optimisation paths).

        Under DeepSpeed the engine clips (``gradient_clipping``, set by :func:`strategies.prepare`) and
        Lightning's clip call is a no-op, so this is skipped there."""
        if self.optim_config.max_grad_norm and not strategies.clips_in_engine(self.trainer.strategy):
            self.clip_gradients(optimizer, gradient_clip_val=self.optim_config.max_grad_norm,
                                gradient_clip_algorithm="norm")  # fmt: skip

    def _log_skipped_grad_norm(self) -> None:
        """A skipped step has no gradient: NaN, so that loggers do not repeat the previous step's norm."""
        if self.step_config.log_grad_norm and self._is_logging_step():
            self.log("train/grad_norm", float("nan"), on_step=True, rank_zero_only=True)

    def _log_grad_norm(self) -> None:
        # Only on logging steps: the norm reads every gradient (and syncs the device).
        if self.step_config.log_grad_norm and self._is_logging_step():
            norms = grad_norm(self.encoder, norm_type=2)
            if "grad_2.0_norm_total" in norms:
                self.log("train/grad_norm", norms["grad_2.0_norm_total"], on_step=True, rank_zero_only=True)

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self._check_tokenizer(getattr(datamodule, "tokenizer", None) if datamodule is not None else None)
        rows = getattr(getattr(datamodule, "config", None), "batch_size", None)
        if rows is not None:
            check_global_batch(rows, self.trainer.world_size)
        self._check_max_length(getattr(getattr(datamodule, "config", None), "max_length", None))
        # The strategy's precision converted the encoder (64-true, bf16-true, DeepSpeed's bf16) but not the
        # unregistered reference and teacher: give them the encoder's device and dtype (like compared with like).
        dtype = next(p.dtype for p in self.encoder.parameters() if p.is_floating_point())
        if self._reference is not None:
            self._reference.to(device=self.device, dtype=dtype)
        self.objectives.teacher_to(self.device, dtype)

    def _check_tokenizer(self, tokenizer) -> None:
        vocab = self.encoder.backbone.get_input_embeddings().num_embeddings
        if tokenizer is not None and len(tokenizer) > vocab:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the encoder's embedding table has {vocab} rows: "
                "--data.tokenizer must be the model's tokenizer (or set --model.encoder.vocab_size)"
            )

    def _check_max_length(self, max_length: int | None) -> None:
        """Before any step: sentences are cut to max_length tokens, which the position table must hold."""
        towers = [self.encoder.backbone] + ([self.encoder.pivot_backbone] if self.encoder.pivot_backbone else [])
        for tower in towers:
            limit = max_positions(tower.config)
            if max_length is not None and limit is not None and max_length > limit:
                raise ValueError(
                    f"--data.max_length {max_length} is longer than the model's {limit} positions "
                    f"(max_position_embeddings of {self.encoder_config.name_or_path}): the first sentence over "
                    f"{limit} tokens would crash the run; set --data.max_length {limit} or less"
                )

    def setup(self, stage: str) -> None:
        # Every rank, before the strategy wraps the model: refuse what the strategy cannot run.
        if stage == "fit" and self._trainer is not None:
            if self.objectives.adversarial.enabled:  # the discriminator's outputs: the data's language vocabulary
                dm = getattr(self.trainer, "datamodule", None)
                self.objectives.setup_languages(len(dm.languages) if hasattr(type(dm), "languages") else None)
            self.objectives.setup_teacher(getattr(self.trainer, "datamodule", None))  # stored teacher embeddings
            strategies.prepare(self.trainer, self, gradcache_chunk_size=self.gradcache_config.chunk_size,
                               max_grad_norm=self.optim_config.max_grad_norm)  # fmt: skip

    def on_train_start(self) -> None:
        if self._gradcache is not None:
            strategies.disable_gradient_sync(self.trainer.strategy)  # GradCache averages gradients itself

    def configure_optimizers(self):
        layers = len(transformer_layers(self.encoder.backbone))
        optimizer = build_optimizer(self, self.optim_config, layers)
        total = self.trainer.estimated_stepping_batches if self.trainer is not None else 1
        if not total or total == float("inf"):
            raise ValueError("set --trainer.max_steps (the schedule needs the total number of steps)")
        scheduler = build_scheduler(optimizer, self.optim_config, int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ validation: the evaluation hook

    def on_validation_epoch_start(self) -> None:
        self._val_parts, self._val_rows = [], 0

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        if batch.num_sentences == 0:
            return
        self._val_languages, self._val_pivot = batch.languages, batch.languages[batch.pivot_lang_id]
        kept = sum(p[0].shape[0] for p in self._val_parts)
        if kept >= self.step_config.eval_max_sentences:
            return
        emb = encode_step(self.encoder, batch, self.step_config.token_budget, self.step_config.unpadded).float()
        # batch-local row ids -> ids unique over this rank's whole validation pass
        self._val_parts.append((emb, batch.row_ids + self._val_rows, batch.lang_ids))
        self._val_rows += batch.num_rows

    def on_validation_epoch_end(self) -> None:
        metrics = self._evaluation_epoch_end("val/")
        if metrics is not None:
            self.last_eval = metrics  # checkpoints and the export's model card

    # ``align test``: the same evaluation hook on the test split, logged under test/
    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._evaluation_epoch_end("test/")

    def _evaluation_epoch_end(self, prefix: str) -> dict[str, float] | None:
        from alignment.evaluate.suite import validation_metrics

        if self.trainer.sanity_checking:
            return None
        device = self.device
        if self._val_rows == 0 and not self.trainer.world_size > 1:
            return None
        if self._val_parts:
            emb = torch.cat([p[0] for p in self._val_parts])  # (n, D)
            rows = torch.cat([p[1] for p in self._val_parts])  # (n,)
            langs = torch.cat([p[2] for p in self._val_parts])  # (n,)
        else:
            emb = torch.zeros(0, self.encoder.embedding_dim, device=device)
            rows = langs = torch.zeros(0, dtype=torch.long, device=device)
        # one code path for any world size: global row ids, padding masked
        cands = distributed.gather_candidates(emb, rows, langs)
        valid = cands.valid
        metrics = validation_metrics(
            cands.emb[valid].detach().cpu(),
            cands.row_ids[valid].cpu(),
            cands.lang_ids[valid].cpu(),
            pivot=self._val_pivot,
            vocabulary=list(self._val_languages),
            prefix=prefix,
        )
        # every rank computed the same numbers from the same gathered tensors
        metrics = {k: float(v) for k, v in metrics.items()}
        self.log_dict(metrics, on_epoch=True, sync_dist=False)
        self._val_parts = []
        return metrics

    # ------------------------------------------------------------------ checkpoints and export

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store what export needs to rebuild the encoder without the hub."""
        from alignment.export import CKPT_HF_CONFIG, CKPT_PREFIXES, CKPT_TOKENIZER

        checkpoint[CKPT_HF_CONFIG] = self.encoder.backbone.config.to_dict()
        config = getattr(getattr(self.trainer, "datamodule", None), "config", None)
        tokenizer = getattr(config, "tokenizer", None)
        if tokenizer is not None and Path(str(tokenizer)).exists():
            tokenizer = str(Path(str(tokenizer)).resolve())  # export and eval from any directory find it
        checkpoint[CKPT_TOKENIZER] = tokenizer
        prefix = getattr(config, "text_prefix", "")
        checkpoint[CKPT_PREFIXES] = {"query": prefix, "document": prefix} if prefix else {}
        checkpoint["alignment_nonfinite_total"] = self.nonfinite_total
        checkpoint["alignment_empty_steps_total"] = self.empty_steps_total
        checkpoint[CKPT_RUN] = describe_run(self, self.trainer)
        if self.encoder_config.adapter.checkpoint_adapter_only:
            adapters.keep_trainable(checkpoint, self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is not None and self.trainer.state.fn == "fit":  # resuming: only this run's checkpoints
            name = str(self.trainer.ckpt_path or "the checkpoint")
            check_resume(checkpoint, describe_run(self, self.trainer), name)
        self.nonfinite_total = checkpoint.get("alignment_nonfinite_total", 0)
        self.empty_steps_total = checkpoint.get("alignment_empty_steps_total", 0)
        self.last_eval = dict((checkpoint.get(CKPT_RUN) or {}).get("last_eval") or {})

    def export_encoder(self, directory, tokenizer=None) -> None:
        """Write the trained encoder (and tokenizer) as a Hugging Face + sentence-transformers folder."""
        from alignment.export import export_encoder

        export_encoder(self.encoder, directory, tokenizer=tokenizer)
