"""The only module that imports ``torch.distributed``.

Owns collectives (gather with gradients), rank/world detection and launcher
environment detection. World size 1 takes the same code path as N.
"""

from __future__ import annotations

import os

import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
