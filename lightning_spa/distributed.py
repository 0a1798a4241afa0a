"""Sharding-aware pieces of the diagnostics (``THEORY.md`` section 8).

- Ordinary tensors (one process, DDP): every rank holds the whole parameter and, after DDP's
  gradient averaging, the same gradient. Norms and dot products are computed locally and need
  no communication.
- DTensor parameters (FSDP2 ``fully_shard``, tensor parallelism): each rank holds a local shard.
  Sums of squares and dot products are taken over the local shards and summed across ranks by
  one ``all_reduce(SUM)`` of a small vector, called on every rank in the same order. A mesh
  dimension on which the tensor is replicated (HSDP) repeats each entry; its contribution is
  divided by the replication factor so the sum counts every entry once.

The reduction runs over the default process group, which must span the DTensors' device mesh
(the usual set-up: the mesh covers all ranks).
"""

from __future__ import annotations

import math

import torch.distributed as dist
from torch import Tensor

__all__ = ["is_sharded", "local_tensor", "replication_factor", "has_sharded_params", "reduce_partial_sums"]

try:  # torch >= 2.4 has the public module; keep the import optional for builds without distributed
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None  # type: ignore[assignment,misc]


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (its local part is a shard or a replica on a device mesh)."""
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The part of ``t`` stored on this rank (``t`` itself for an ordinary tensor); no copy."""
    return t.to_local() if is_sharded(t) else t  # type: ignore[attr-defined]


def replication_factor(t: Tensor) -> int:
    """How many ranks hold each entry of DTensor ``t`` (product of its non-sharded mesh dims).

    Raises:
        ValueError: ``t`` has a ``Partial`` placement (pending reduction), which a parameter,
            gradient or momentum buffer should not have at step time.
    """
    mesh, placements = t.device_mesh, t.placements  # type: ignore[attr-defined]
    factor = 1
    for dim, placement in enumerate(placements):
        if placement.is_partial():
            raise ValueError(
                "MomentumDiagnostics cannot measure a DTensor with a Partial placement; "
                "reduce it (redistribute to Shard/Replicate) before the optimizer step."
            )
        if placement.is_replicate():
            factor *= mesh.size(dim)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    covered = math.prod(mesh.size(d) for d in range(mesh.ndim))
    return factor * (world // covered if covered and world % covered == 0 else 1)


def has_sharded_params(params: list[Tensor]) -> bool:
    """Whether any of ``params`` is a DTensor; decides if the reduction is needed (same on all ranks)."""
    return any(is_sharded(p) for p in params)


def reduce_partial_sums(vector: Tensor) -> Tensor:
    """Sums ``vector`` across all ranks (one ``all_reduce``); returns it unchanged in one process.

    Every rank must call it at the same step with a vector of the same shape and dtype.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return vector
    out = vector.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
