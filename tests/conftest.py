"""Shared fixtures: leftover process groups are destroyed and wandb's service address is dropped after every test."""

from __future__ import annotations

import os

import pytest
import torch.distributed as dist

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _destroy_process_group():
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _forget_wandb_service():
    """An in-process wandb run stores its service's address in ``WANDB_SERVICE``; a later test's
    subprocess (``align fit``, an sbatch job, which inherits the environment) would log through
    that service instead of starting its own, and its offline files could then never appear."""
    yield
    os.environ.pop("WANDB_SERVICE", None)
