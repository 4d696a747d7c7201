"""Everything that depends on the training strategy (DDP, DeepSpeed ZeRO-1/2/3), in one place.

The module, the callbacks and the YAMLs call these and know no strategy:

- :func:`prepare` (``AlignmentModule.setup``, every rank, before the strategy
  builds its engine): refuses combinations that would train wrongly, with one
  line naming both flags, fills in DeepSpeed config defaults the streamed
  loader needs (:func:`deepspeed_config_defaults`) and turns DDP's per-step
  buffer broadcast off where it moves nothing (:func:`ddp_defaults`).
- :func:`check_clipping`, :func:`clips_in_engine`, :func:`deepspeed_clipping`: one clipping knob,
  ``--model.optim.max_grad_norm``; the module clips, except under DeepSpeed, whose engine clips.
- :func:`disable_gradient_sync` (GradCache under DDP): DDP's reducer allows one
  backward per sync; GradCache runs several, so DDP's sync is switched off and
  the module averages gradients itself (``distributed.average_gradients_``).
- :func:`full_parameters` (export at the end of ``fit``): under ZeRO-3 every
  rank holds only a slice of each parameter; the full weights exist only inside
  ``deepspeed.zero.GatheredParameters``, which every rank must enter together.

What each strategy supports: README, "Strategies and features".

GradCache under DeepSpeed is refused because it calls ``backward`` and the
optimiser directly, bypassing the engine (its gradient partitioning and
reduction, loss scaling, clipping and step); no test proves it equivalent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DEEPSPEED_LOGGING_BATCH_SIZE = 1
"""``train_micro_batch_size_per_gpu`` when the DeepSpeed config has none: DeepSpeed only uses it for its
own throughput log, and Lightning's automatic lookup (``loader.batch_sampler.batch_size``) fails on the
streamed loader, which batches inside the dataset (``batch_sampler`` is None)."""


def _is_deepspeed(strategy) -> bool:
    try:
        from lightning.pytorch.strategies import DeepSpeedStrategy
    except ImportError:  # pragma: no cover - lightning always has the class; deepspeed may be missing
        return False
    return isinstance(strategy, DeepSpeedStrategy)


def _is_ddp_or_single(strategy) -> bool:
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    return isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not _is_deepspeed(strategy)


def zero_stage(strategy) -> int | None:
    """DeepSpeed's ZeRO stage (0-3) of ``strategy``; None when it is not DeepSpeed."""
    if not _is_deepspeed(strategy):
        return None
    config = strategy.config if isinstance(getattr(strategy, "config", None), dict) else {}
    return int(config.get("zero_optimization", {}).get("stage", 0))


def describe(strategy) -> str:
    """``DeepSpeedStrategy (ZeRO stage 3)``, ``DDPStrategy``: how error messages name a strategy."""
    stage = zero_stage(strategy)
    name = type(strategy).__name__
    return f"{name} (ZeRO stage {stage})" if stage is not None else name


def check_supported(strategy, *, gradcache_chunk_size: int) -> None:
    """Refuse, before any compute, a feature the strategy cannot run correctly (one line, both flags)."""
    if gradcache_chunk_size > 0 and not _is_ddp_or_single(strategy):
        why = ("it runs several backward passes and its own optimiser step per batch, outside DeepSpeed's engine "
               "(gradient partitioning, loss scaling, clipping and step)" if _is_deepspeed(strategy)
               else "it is only implemented for single-device and DDP training")
        raise ValueError(
            f"--model.gradcache.chunk_size {gradcache_chunk_size} is not supported with --trainer.strategy "
            f"{describe(strategy)}: {why}; use --model.gradcache.chunk_size 0, or --trainer.strategy ddp"
        )


def deepspeed_config_defaults(strategy) -> None:
    """Fill in DeepSpeed config keys the project needs (no-op for other strategies); values the user set stay.

    - ``train_micro_batch_size_per_gpu``: :data:`DEEPSPEED_LOGGING_BATCH_SIZE`.
    - ``zero_force_ds_cpu_optimizer: false`` when the optimiser is offloaded (``configs/deepspeed/zero3-offload.yaml``):
      the module's optimiser is ``torch.optim.AdamW`` (``alignment.optim``), which DeepSpeed otherwise refuses
      at start-up under ZeRO-Offload (``ZeRORuntimeException: You are using ZeRO-Offload with a client provided
      optimizer``). It then steps the offloaded fp32 master weights on the CPU, correctly but slower than
      DeepSpeed's SIMD ``DeepSpeedCPUAdam``.
    """
    if not (_is_deepspeed(strategy) and isinstance(strategy.config, dict)):
        return
    config = strategy.config
    config.setdefault("train_micro_batch_size_per_gpu", DEEPSPEED_LOGGING_BATCH_SIZE)
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    if offload.get("device", "none") in ("cpu", "nvme"):
        config.setdefault("zero_force_ds_cpu_optimizer", False)


def check_clipping(trainer) -> None:
    """Refuse Lightning's ``gradient_clip_val``: it does not work under manual optimisation (GradCache), so the
    project has one clipping knob that works on every path, ``--model.optim.max_grad_norm``."""
    if getattr(trainer, "gradient_clip_val", None) is not None:
        raise ValueError(
            f"--trainer.gradient_clip_val {trainer.gradient_clip_val} is not supported (Lightning cannot clip under "
            "manual optimisation, which GradCache uses): set --model.optim.max_grad_norm instead, which clips "
            "with and without GradCache and under DeepSpeed"
        )


def clips_in_engine(strategy) -> bool:
    """Whether the strategy's engine clips gradients itself (DeepSpeed's ``gradient_clipping``)."""
    return _is_deepspeed(strategy)


def deepspeed_clipping(strategy, max_grad_norm: float | None) -> None:
    """Hand ``--model.optim.max_grad_norm`` to DeepSpeed's ``gradient_clipping`` (no-op for other strategies).

    Lightning writes ``gradient_clipping: 0.0`` into the config before this runs (from the refused
    ``gradient_clip_val``); a different non-zero value in the user's DeepSpeed config is a conflict."""
    if not max_grad_norm or not (_is_deepspeed(strategy) and isinstance(strategy.config, dict)):
        return
    given = strategy.config.get("gradient_clipping") or 0.0
    if given and given != max_grad_norm:
        raise ValueError(
            f"--model.optim.max_grad_norm {max_grad_norm} conflicts with gradient_clipping {given} in the DeepSpeed "
            "config: set one of them"
        )
    strategy.config["gradient_clipping"] = float(max_grad_norm)


def ddp_defaults(strategy, module: torch.nn.Module) -> None:
    """DDP without its per-forward buffer broadcast, when no buffer of ``module`` holds running statistics.

    DDP broadcasts rank 0's buffers before every forward (one collective per
    step). A Hugging Face encoder's buffers are constants every rank builds
    identically (``position_ids``, ``token_type_ids``), so the broadcast moves
    nothing; a model with BatchNorm-style running statistics keeps it. A
    setting given by the user (``--trainer.strategy.init_args.broadcast_buffers``)
    is left alone.
    """
    from lightning.pytorch.strategies import DDPStrategy

    kwargs = getattr(strategy, "_ddp_kwargs", None)
    if not isinstance(strategy, DDPStrategy) or _is_deepspeed(strategy) or not isinstance(kwargs, dict):
        return
    if any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in module.modules()):
        return
    if "broadcast_buffers" in kwargs or "forward_sync_buffers" in kwargs:
        return
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    name = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")  # renamed in torch 2.13
    kwargs[name] = False


def prepare(
    trainer, module: torch.nn.Module, *, gradcache_chunk_size: int = 0, max_grad_norm: float | None = None
) -> None:
    """Every rank, at ``setup`` (before the strategy wraps ``module``): refuse unsupported combinations,
    then strategy defaults."""
    strategy = trainer.strategy
    check_clipping(trainer)
    check_supported(strategy, gradcache_chunk_size=gradcache_chunk_size)
    deepspeed_config_defaults(strategy)
    deepspeed_clipping(strategy, max_grad_norm)
    ddp_defaults(strategy, module)


def disable_gradient_sync(strategy) -> None:
    """Switch DDP's gradient all-reduce off for the rest of ``fit`` (GradCache averages gradients itself)."""
    wrapped = getattr(strategy, "model", None)
    if hasattr(wrapped, "require_backward_grad_sync"):  # DistributedDataParallel
        wrapped.require_backward_grad_sync = False


def is_partitioned(module: torch.nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ZeRO-3 partition (a slice of the weight on each rank)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextlib.contextmanager
def full_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block every parameter of ``module`` holds its full weight, on every rank.

    Under ZeRO-3 this is ``deepspeed.zero.GatheredParameters`` over all of the
    module's parameters: a collective, so **every rank must enter it**, even if
    only rank 0 then reads the weights (read-only: changes are not written
    back). Peak memory is the full module per rank for the duration of the
    block. Without partitioned parameters (DDP, ZeRO-1/2) it does nothing.
    """
    if not is_partitioned(module):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield
