"""``alignment.strategies``: start-up refusals and defaults, on the strategy objects Lightning builds.

The refusal is also exercised end to end on 2 DeepSpeed ranks (``tests/distributed/test_deepspeed_cpu.py``);
here every DeepSpeed stage, offload and FSDP are checked without starting a process group.
"""

from __future__ import annotations

import pytest
import torch

from alignment import strategies


def _deepspeed(**kwargs):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(stage=1), dict(stage=2), dict(stage=3),
                                    dict(stage=3, offload_optimizer=True, offload_parameters=True)])
def test_gradcache_is_refused_under_every_deepspeed_stage_naming_both_flags(kwargs):
    strategy = _deepspeed(**kwargs)
    with pytest.raises(ValueError) as exc:
        strategies.check_supported(strategy, gradcache_chunk_size=8)
    message = str(exc.value)
    assert message.startswith("--model.gradcache.chunk_size 8 is not supported with --trainer.strategy "
                              f"DeepSpeedStrategy (ZeRO stage {kwargs['stage']})")
    assert "\n" not in message
    strategies.check_supported(strategy, gradcache_chunk_size=0)  # GradCache off: fine


def test_gradcache_is_refused_under_fsdp_and_accepted_under_ddp_and_one_device():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

    with pytest.raises(ValueError, match=r"--model.gradcache.chunk_size 4 is not supported with --trainer.strategy "
                                         r"FSDPStrategy: it is only implemented for single-device and DDP"):
        strategies.check_supported(FSDPStrategy(), gradcache_chunk_size=4)
    strategies.check_supported(DDPStrategy(), gradcache_chunk_size=4)
    strategies.check_supported(SingleDeviceStrategy(torch.device("cpu")), gradcache_chunk_size=4)


def test_deepspeed_logging_batch_size_default_and_user_value_kept():
    strategy = _deepspeed(stage=2)
    assert "train_micro_batch_size_per_gpu" not in strategy.config
    strategies.deepspeed_config_defaults(strategy)
    assert strategy.config["train_micro_batch_size_per_gpu"] == strategies.DEEPSPEED_LOGGING_BATCH_SIZE
    mine = _deepspeed(stage=2, logging_batch_size_per_gpu=16)
    strategies.deepspeed_config_defaults(mine)
    assert mine.config["train_micro_batch_size_per_gpu"] == 16


def test_ddp_buffer_broadcast_off_only_without_running_statistics():
    from lightning.pytorch.strategies import DDPStrategy

    plain = DDPStrategy()
    strategies.ddp_defaults(plain, torch.nn.Linear(2, 2))
    assert False in plain._ddp_kwargs.values()
    with_bn = DDPStrategy()
    strategies.ddp_defaults(with_bn, torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))
    assert with_bn._ddp_kwargs == {}
    user = DDPStrategy(broadcast_buffers=True)
    strategies.ddp_defaults(user, torch.nn.Linear(2, 2))
    assert user._ddp_kwargs == {"broadcast_buffers": True}


def test_offloaded_optimizer_accepts_the_projects_adamw():
    """configs/deepspeed/zero3-offload.yaml: DeepSpeed refuses a torch optimiser under ZeRO-Offload unless told."""
    offloaded = _deepspeed(stage=3, offload_optimizer=True, offload_parameters=True)
    strategies.deepspeed_config_defaults(offloaded)
    assert offloaded.config["zero_force_ds_cpu_optimizer"] is False
    on_device = _deepspeed(stage=3)
    strategies.deepspeed_config_defaults(on_device)
    assert "zero_force_ds_cpu_optimizer" not in on_device.config
