"""Partials of many splits -- or of many processes -- merged once per channel, in a launch of
its own, and the synchronized calls' collectives around it."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import plan as planner
from .planning import tl_acc
from .run import constants, run

__all__ = ["merge_partials", "world_size", "gather_moments", "sums_over_processes"]


def merge_partials(part: torch.Tensor, moments: bool) -> torch.Tensor:
    """(Q, K, C) partials -> (Q, C): Chan-merged moments (Q = 3) or summed sums (Q = 2), in a
    launch of its own (many splits, or the summaries synchronized processes exchange)."""
    q, k, c = part.shape
    out = torch.empty((q, c), dtype=part.dtype, device=part.device)
    # About 16 programs whatever C (a few KB of partials each), each loading MERGE_TILE
    # partials at once: 1,024 over 4 warps is 8 per thread and accumulator
    block_c = max(1, min(planner.pow2(c) // 16, 128))
    block_k = max(1, min(planner.pow2(k), planner.MERGE_TILE // block_c))
    run("bn_merge_partials_kernel", (planner.cdiv(c, block_c),),
        {"PART": part, "OUT": out, "size_c": c, "n_splits": k},
        constants(None, MOMENTS=moments, ACC=tl_acc(part.dtype), BLOCK_K=block_k,
                  BLOCK_C=block_c, num_warps=4))
    return out


# ------------------------------------------------------------------------ synchronized calls

def _group(name: str):
    return dist.distributed_c10d._resolve_process_group(name)


def world_size(name: str) -> int:
    return dist.get_world_size(_group(name))


def gather_moments(local: torch.Tensor, name: str) -> torch.Tensor:
    """(3, C) per process -> (3, world, C), in rank order."""
    group = _group(name)
    world = dist.get_world_size(group)
    out = local.new_empty((world * local.shape[0], local.shape[1]))  # ranks stacked on dim 0
    dist.all_gather_into_tensor(out, local.contiguous(), group=group)
    return out.view(world, *local.shape).transpose(0, 1).contiguous()


def sums_over_processes(local: torch.Tensor, count: int, name: str) -> torch.Tensor:
    """Local (2, C) sums -> (global sums / global count, as (2, C)): the means grad_input needs.
    The element count rides along in the same all_reduce: no host sync, nothing stashed."""
    with_count = torch.cat([local, local.new_full((1, local.shape[1]), float(count))])
    dist.all_reduce(with_count, group=_group(name))
    return with_count[:2] / with_count[2:].clamp(min=1.0)
