"""Data-parallel communication and rank ownership: which rank owns each layer
(:mod:`.placement`), the collectives interface (:mod:`.communicator`) and its torch.distributed
implementation (:mod:`.collectives`)."""

from __future__ import annotations

from typing import Any

import torch

from .collectives import TorchDistributedCommunicator
from .communicator import Communicator, LocalCommunicator

__all__ = ["Communicator", "LocalCommunicator", "TorchDistributedCommunicator", "default_communicator"]


def default_communicator(process_group: Any = None, comm_dtype: torch.dtype | None = None) -> Communicator:
    """The communicator for the current run: torch.distributed when initialised with >1 rank.

    Args:
        process_group: the group to communicate over (default: the world).
        comm_dtype: the wire dtype of the statistics (None: float32).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        group = process_group if process_group is not None else dist.group.WORLD
        if dist.get_world_size(group) > 1:
            return TorchDistributedCommunicator(group, comm_dtype=comm_dtype)
    return LocalCommunicator()
