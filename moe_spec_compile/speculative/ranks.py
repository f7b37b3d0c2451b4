"""Decoding under torchrun, on a model transformers sharded over several ranks (tensor / expert parallel plans).

Every rank of the model's group runs the same loop on the same tokens: the sharded layers' collectives need the
same pass on every rank. Greedy drafting, verification and acceptance are identical by construction (each rank
holds the same replicated logits after the model's own all-reduce or all-gather). Three things are not, and are
decided here:
    the request: checked identical on every rank when generate starts (one all-reduce; a mismatch raises on every
        rank, never a hang);
    sampling: one generator state for all (rank src's, or a seed it draws), sent when generate starts;
    tree="auto" / budget="auto": the controller's choice times steps on each rank, so rank src's choice is sent
        each step (one broadcast, the only per-step collective).
A model whose parameters hold no DTensor (replicated on every rank, or a single process) needs none of this.
"""

from __future__ import annotations

import torch

__all__ = ["RankGroup"]


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


class RankGroup:
    """The ranks that hold one sharded model: they decode in lockstep."""

    def __init__(self, group, ranks: list[int], device: torch.device):
        self.group, self.ranks = group, ranks
        self.src = ranks[0]  # the global rank whose decisions the others take
        dist = _dist()
        backend = dist.get_backend(group)
        self.device = torch.device("cpu") if backend == "gloo" else device

    @classmethod
    def of(cls, model: torch.nn.Module) -> RankGroup | None:
        """The group of `model`'s sharded parameters, or None (no process group, or nothing sharded)."""
        dist = _dist()
        if dist is None:
            return None
        meshes = {id(m): m for p in model.parameters() if (m := getattr(p, "device_mesh", None)) is not None}
        if not meshes:
            return None
        by_ranks = {}
        for mesh in meshes.values():
            if mesh.ndim != 1:
                raise ValueError(f"the model is sharded over a {mesh.ndim}-D device mesh; SpeculativeDecoder runs "
                                 "models whose parameters are sharded over 1-D meshes (transformers' tensor / "
                                 "expert parallel plans without data parallel replicas)")
            group = mesh.get_group()
            by_ranks.setdefault(tuple(sorted(dist.get_process_group_ranks(group))), group)
        if len(by_ranks) != 1:
            raise ValueError(f"the model's parameters are sharded over different groups of ranks {sorted(by_ranks)}; "
                             "SpeculativeDecoder needs one group that holds the whole model")
        (ranks, group), = by_ranks.items()
        return cls(group, list(ranks), next(model.parameters()).device)

    def _tensor(self, values, dtype=torch.int64) -> torch.Tensor:
        return torch.as_tensor(values, dtype=dtype, device=self.device)

    def check_same(self, ids: torch.Tensor, *settings: float) -> None:
        """Raise ValueError on every rank unless every rank has the same request (ids and settings)."""
        flat = ids.reshape(-1).to(torch.float64).cpu()
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
        fingerprint = [float(ids.shape[0]), float(ids.shape[-1]), float((flat * weights).sum()),
                       float((flat * weights.flip(0)).sum()), *map(float, settings)]
        t = self._tensor(fingerprint + [-f for f in fingerprint], torch.float64)
        mine = t.clone()
        _dist().all_reduce(t, op=_dist().ReduceOp.MAX, group=self.group)
        if not torch.equal(t, mine):
            raise ValueError(f"the ranks {self.ranks} that hold this model were given different requests (input_ids, "
                             "attention_mask or generation settings): every rank must decode the same one")

    def generator(self, generator: torch.Generator | None) -> torch.Generator:
        """One sampling generator state on every rank: rank src's (its generator's, or a seed drawn from its default
        generator), sent once."""
        dist = _dist()
        if generator is None:
            seed = self._tensor([int(torch.randint(0, 2**62, (1,)).item())])
            dist.broadcast(seed, src=self.src, group=self.group)
            return torch.Generator().manual_seed(int(seed.item()))
        state = generator.get_state().to(self.device)
        dist.broadcast(state, src=self.src, group=self.group)
        generator.set_state(state.cpu())
        return generator

    def agree(self, choice, options) -> object:
        """Rank src's `choice` (one of `options`) on every rank: one broadcast."""
        options = list(options)
        t = self._tensor([options.index(choice)])
        _dist().broadcast(t, src=self.src, group=self.group)
        return options[int(t.item())]
