"""transformers' DistributedConfig for a parallel layout by name, on the transformers releases moespec supports.

    distributed_config("ep", world)     experts split over the ranks, everything else whole on each
    distributed_config("tp", world)     the model's tensor parallel plan (attention, dense MLPs); experts whole
    distributed_config("tp+ep", world)  both

transformers >= 5.21 names expert parallelism `ep_size` (with `tp_plan={}` for experts alone); earlier 5.x releases
`enable_expert_parallel=True`, which applies the expert plan alone. What a release cannot express is a ValueError
naming it, never another layout. How moespec runs such a model: docs/PARALLEL.md.
"""

from __future__ import annotations

import dataclasses

__all__ = ["LAYOUTS", "distributed_config", "unsupported"]

LAYOUTS = ("ep", "tp", "tp+ep")


def unsupported(layout: str) -> str:
    """Why the installed transformers cannot shard with `layout` ("" when it can)."""
    import transformers

    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return f"transformers {transformers.__version__} has no DistributedConfig: it cannot shard a model"
    if layout not in LAYOUTS:
        return f"layout must be one of {LAYOUTS}, got {layout!r}"
    fields = {f.name for f in dataclasses.fields(DistributedConfig)}
    if layout == "tp" or "ep_size" in fields or layout == "ep" and "enable_expert_parallel" in fields:
        return ""
    return (f"transformers {transformers.__version__} cannot shard with layout {layout!r} (its DistributedConfig has "
            "no ep_size; expert parallelism there is the expert plan alone: 'ep')")


def distributed_config(layout: str, world: int):
    """A `transformers.distributed.DistributedConfig` sharding a model over `world` ranks as `layout` says."""
    why = unsupported(layout)
    if why:
        raise ValueError(why)
    if isinstance(world, bool) or not isinstance(world, int) or world < 2:
        raise ValueError(f"sharding needs at least 2 ranks, got {world!r}")
    from transformers.distributed import DistributedConfig

    fields = {f.name for f in dataclasses.fields(DistributedConfig)}
    if layout == "tp":
        return DistributedConfig(tp_size=world)
    if "ep_size" in fields:
        return DistributedConfig(ep_size=world, **({"tp_plan": {}} if layout == "ep" else {"tp_size": world}))
    return DistributedConfig(tp_size=world, enable_expert_parallel=True)
