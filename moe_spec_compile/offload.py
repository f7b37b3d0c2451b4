"""Expert offloading: every MoE layer's expert weights in a store, R of them resident in a pool on the compute device.

    handle = msc.offload_experts(model, resident=R, store="host" | "disk" | a Store, policy="lfu")
    model(...)              # eagerly, or torch.compile(model, backend="moespec", options={"budget": C})
    handle.stats()          # {block: {"resident", "hits", "misses", "loaded_bytes", ...}}
    handle.restore()        # the weights back in the model, the offload undone

Per experts module (transformers' stacked gate_up_proj [E, 2I, H] / down_proj [E, H, I], layout confirmed
numerically against the module's own forward): a pool of R slots and a device-side expert -> slot table (-1: not
resident). Each call of the module becomes moespec::offloaded_experts(hidden, ids, weights, table): the experts the
pass routes to are read back once, the missing ones are loaded once each (deduplicated over the pass's tokens),
evicting by the policy, and the pass runs as moespec::fused_experts over the pool with ids mapped through the table.
A pass needing more than R experts runs in waves of at most R. Nothing is ever copied back (weights are read-only).

Under a budget C the routing gives each pass at most C experts, so a pass misses at most C: the budget caps the
loads. Policies: "lru" (least recently used, mixtral-offloading's), "lfu" (use counts with exponential decay, ties by
recency; the default: on the bundled target's decode traces it beats LRU, benchmarks/results/offload_cpu.md),
"lfu+draft" (LFU plus the self-drafter's draft scores: what its drafting passes' routers wanted; measured no gain).

Stores: "host" (host memory; pinned when the model is on CUDA), "disk" (a safetensors file read through mmap, for
models larger than RAM), or Throttled(store, bytes_per_s) (a simulated tier: each load takes at least bytes /
bandwidth of wall time; say so wherever its figures are shown).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

from .checks import ACTIVATIONS
from .experts_op import fused_experts_torch

__all__ = ["offload_experts", "OffloadHandle", "Store", "HostStore", "DiskStore", "Throttled", "POLICIES", "SlotCache",
           "belady_hits"]

POLICIES = ("lru", "lfu", "lfu+draft")
LFU_DECAY = 0.9  # per pass of the layer: a use counts 1 now, 0.9 a pass later, ...
# "lfu+draft" ranks an expert by its decayed use count plus DRAFT_WEIGHT times its draft score: the share of the last
# drafting step's tokens whose router wanted it (SelfDrafter: its tokens' own top-k before the resident-only
# restriction), so a verify pass evicts what the draft did not ask for first (after MoE-SpAc: the draft's expert hits
# drive eviction). Not the default: measured with the self-drafter, chain 4, R = E/4 (4 held-out prompts x 48 tokens
# on the bundled target, 3 x 32 on the config MoE), weights 0.5 to 100 moved 1.00-1.09x the bytes per token of plain
# LFU (bundled 1.48 -> 1.48-1.61 MB, config 52.7 -> 53.3-54.6 MB) at the same or a lower hit rate: the experts a draft
# wanted that its verify pass did not need were its mispredictions, no likelier than others to be needed next.
DRAFT_WEIGHT = 2.0


# --- stores --------------------------------------------------------------------------------------------------

class Store:
    """Where offloaded expert weights live. `put(name, gate_up, down)` takes one module's stacked weights;
    `load(name, e, slot_gate_up, slot_down)` copies expert e into the slot tensors (views of the pool)."""

    def put(self, name: str, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        raise NotImplementedError

    def load(self, name: str, e: int, slot_gate_up: torch.Tensor, slot_down: torch.Tensor) -> None:
        raise NotImplementedError

    def full(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's stacked weights (for restore)."""
        raise NotImplementedError

    def check_room(self, nbytes: int, device: torch.device) -> None:
        """Raise ValueError when this store cannot take `nbytes` of weights now on `device`."""

    def close(self) -> None:
        pass


class HostStore(Store):
    """Host memory; pinned (for asynchronous copies) when the model is on CUDA and pinning is possible."""

    def __init__(self, pin: bool | None = None):
        self.pin = pin
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def put(self, name, gate_up, down):
        pin = self.pin if self.pin is not None else gate_up.is_cuda
        host = [t.detach().to("cpu", copy=gate_up.is_cuda) for t in (gate_up, down)]
        if pin:
            host = [t.pin_memory() for t in host]
        self.tensors[name] = (host[0], host[1])

    def load(self, name, e, slot_gate_up, slot_down):
        gu, dn = self.tensors[name]
        slot_gate_up.copy_(gu[e], non_blocking=gu.is_pinned())
        slot_down.copy_(dn[e], non_blocking=dn.is_pinned())

    def full(self, name):
        return self.tensors[name]

    def check_room(self, nbytes, device):
        avail = _available_ram()
        if device.type != "cpu" and avail is not None and nbytes > avail:  # a CPU model's weights stay where they are
            raise ValueError(f"the host store needs {nbytes / 2**30:.2f} GiB of host memory; {avail / 2**30:.2f} GiB "
                             "are available")


class DiskStore(Store):
    """A safetensors file (one per offload) read through mmap: the experts stay on disk, pages come in on demand."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.dir = tempfile.mkdtemp(prefix="moespec-offload-") if path is None else os.fspath(path)
        os.makedirs(self.dir, exist_ok=True)
        self.path = os.path.join(self.dir, "experts.safetensors")
        self._pending: dict[str, torch.Tensor] = {}
        self._file = None
        self._slices: dict[str, object] = {}

    def put(self, name, gate_up, down):
        self._pending[f"{name}.gate_up_proj"] = gate_up.detach().cpu().contiguous()
        self._pending[f"{name}.down_proj"] = down.detach().cpu().contiguous()

    def finish(self) -> None:
        """Write what was put to the file, then read it back through mmap only."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        save_file(self._pending, self.path)
        self._pending.clear()
        self._file = safe_open(self.path, framework="pt")

    def _slice(self, key: str):
        s = self._slices.get(key)
        if s is None:
            s = self._slices[key] = self._file.get_slice(key)
        return s

    def load(self, name, e, slot_gate_up, slot_down):
        slot_gate_up.copy_(self._slice(f"{name}.gate_up_proj")[e : e + 1][0])
        slot_down.copy_(self._slice(f"{name}.down_proj")[e : e + 1][0])

    def full(self, name):
        return self._file.get_tensor(f"{name}.gate_up_proj"), self._file.get_tensor(f"{name}.down_proj")

    def check_room(self, nbytes, device):
        free = shutil.disk_usage(self.dir).free
        if nbytes > free:
            raise ValueError(f"the disk store at {self.dir} needs {nbytes / 2**30:.2f} GiB; {free / 2**30:.2f} GiB are "
                             "free")

    def close(self):
        self._slices.clear()
        self._file = None


class Throttled(Store):
    """A simulated tier: `inner`'s loads, each taking at least bytes / bytes_per_s of wall time (e.g. 25e9 for PCIe
    4 x16). For tests and benchmarks without the hardware: figures measured through it are a simulation."""

    def __init__(self, inner: Store, bytes_per_s: float):
        if not bytes_per_s > 0:
            raise ValueError(f"bytes_per_s must be > 0, got {bytes_per_s!r}")
        self.inner, self.bytes_per_s = inner, float(bytes_per_s)

    def put(self, name, gate_up, down):
        self.inner.put(name, gate_up, down)

    def finish(self):
        if hasattr(self.inner, "finish"):
            self.inner.finish()

    def load(self, name, e, slot_gate_up, slot_down):
        t0 = time.perf_counter()
        self.inner.load(name, e, slot_gate_up, slot_down)
        wait = (slot_gate_up.nbytes + slot_down.nbytes) / self.bytes_per_s - (time.perf_counter() - t0)
        if wait > 0:
            time.sleep(wait)

    def full(self, name):
        return self.inner.full(name)

    def check_room(self, nbytes, device):
        self.inner.check_room(nbytes, device)

    def close(self):
        self.inner.close()


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _make_store(store) -> Store:
    if isinstance(store, Store):
        return store
    if store == "host":
        return HostStore()
    if store == "disk":
        return DiskStore()
    raise ValueError(f"store must be 'host', 'disk' or a msc.offload.Store, got {store!r}")


# --- which experts are resident: the policy, pure Python (simulated on traces by benchmarks/bench_offload.py) ----

class SlotCache:
    """R slots holding experts; per pass, the experts it needs become resident in waves of at most R (resident ones
    first, so they load nothing), evicting what the policy ranks lowest among experts the wave does not need.
    "lru": the least recently used; "lfu": the lowest use count decayed by LFU_DECAY per pass, ties by recency;
    "lfu+draft": that count plus DRAFT_WEIGHT times the draft score (hint(): what the drafting passes since the last
    verify pass wanted)."""

    def __init__(self, slots: int, policy: str):
        self.slots, self.policy = slots, policy
        self.slot_expert = [-1] * slots  # slot -> expert (-1: free)
        self.where: dict[int, int] = {}  # expert -> slot
        self.last_use: dict[int, int] = {}
        self.freq: dict[int, float] = {}
        self.draft: dict[int, float] = {}  # expert -> draft score in [0, 1] until the next pass that is not drafting
        self.passes = self.hits = self.misses = self.evictions = 0

    def hint(self, scores: dict[int, float]) -> None:
        """A drafting pass's draft scores (expert -> share of its tokens whose router wanted it); the step's passes
        combine by maximum; the next pass that is not a drafting pass uses them and clears them."""
        for e, v in scores.items():
            self.draft[e] = max(self.draft.get(e, 0.0), v)

    def plan(self, needed: list[int], drafting: bool = False) -> list[list[tuple[int, int, int, bool]]]:
        """The pass's waves: per wave (expert, slot, evicted expert or -1, load?) for each of its experts; the cache
        is updated as if every load happened."""
        waves = self._plan(needed)
        if not drafting:
            self.draft = {}
        return waves

    def _plan(self, needed: list[int]) -> list[list[tuple[int, int, int, bool]]]:
        self.passes += 1
        self.freq = {e: f * LFU_DECAY for e, f in self.freq.items() if f * LFU_DECAY > 1e-3}
        for e in needed:
            self.freq[e] = self.freq.get(e, 0.0) + 1.0
        resident = [e for e in needed if e in self.where]
        missing = [e for e in needed if e not in self.where]
        self.hits += len(resident)
        self.misses += len(missing)
        pending, waves = resident + missing, []
        while pending:
            wave, pending = pending[: self.slots], pending[self.slots :]
            keep, steps = set(wave), []
            for e in wave:
                if e in self.where:
                    steps.append((e, self.where[e], -1, False))
                else:
                    slot = self._victim(keep)
                    old = self.slot_expert[slot]
                    if old >= 0:
                        del self.where[old]
                        self.evictions += 1
                    self.slot_expert[slot], self.where[e] = e, slot
                    steps.append((e, slot, old, True))
                self.last_use[e] = self.passes
            waves.append(steps)
        return waves

    def place(self, e: int, keep: set[int]) -> tuple[int, int]:
        """Make e resident outside any pass (a prefetch): (its slot, the evicted expert or -1)."""
        slot = self._victim(keep | {e})
        old = self.slot_expert[slot]
        if old >= 0:
            del self.where[old]
            self.evictions += 1
        self.slot_expert[slot], self.where[e] = e, slot
        self.last_use[e] = self.passes
        return slot, old

    def _victim(self, keep: set[int]) -> int:
        free = [s for s, e in enumerate(self.slot_expert) if e < 0]
        if free:
            return free[0]
        cands = [s for s, e in enumerate(self.slot_expert) if e not in keep]
        if self.policy == "lru":
            return min(cands, key=lambda s: self.last_use.get(self.slot_expert[s], -1))
        weight = DRAFT_WEIGHT if self.policy == "lfu+draft" else 0.0
        score = lambda e: self.freq.get(e, 0.0) + weight * self.draft.get(e, 0.0)  # noqa: E731
        return min(cands, key=lambda s: (score(self.slot_expert[s]), self.last_use.get(self.slot_expert[s], -1)))


def belady_hits(trace: list[list[int]], slots: int) -> tuple[int, int]:
    """(hits, misses) of the optimal offline policy (Belady: evict the expert needed again farthest in the future)
    on a trace of per-pass needed experts, with the same pass semantics as SlotCache (a pass's experts are resident
    together when they fit). The bound a policy's hit rate is measured against."""
    uses: dict[int, list[int]] = {}
    for i, needed in enumerate(trace):
        for e in needed:
            uses.setdefault(e, []).append(i)
    nxt = {e: 0 for e in uses}
    held: set[int] = set()
    hits = misses = 0
    for needed in trace:
        for e in needed:
            nxt[e] += 1  # uses[e][nxt[e]]: e's next use after this pass
        hits += sum(1 for e in needed if e in held)
        for e in [e for e in needed if e not in held]:
            misses += 1
            if len(held) >= slots:
                cands = [x for x in held if x not in needed] or list(held)
                far = max(cands, key=lambda x: uses[x][nxt[x]] if nxt[x] < len(uses[x]) else len(trace) + 1)
                held.discard(far)
            held.add(e)
    return hits, misses


# --- one offloaded experts module ---------------------------------------------------------------------------

@dataclass(eq=False)
class OffloadedBlock:
    name: str  # the experts module's path, e.g. "model.layers.0.mlp.experts"
    num_experts: int
    resident: int
    activation: str
    store: Store
    cache: SlotCache
    pool_gate_up: torch.Tensor  # [R, 2I, H] on the compute device
    pool_down: torch.Tensor  # [R, H, I]
    table: torch.Tensor  # [E] int64 on the device: expert -> slot, -1 not resident
    loaded_bytes: int = 0
    max_resident: int = 0
    trace: list | None = None  # per pass, the experts it needed (while OffloadHandle.record_trace() is on)
    prefetched: set = field(default_factory=set)  # loaded ahead of the next pass that is not a drafting pass
    prefetch_loaded: int = 0
    prefetch_used: int = 0
    pending: object = None  # the prefetch job in flight (a Future), waited for before a verify pass
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def expert_bytes(self) -> int:
        return self.pool_gate_up[0].nbytes + self.pool_down[0].nbytes

    def stats(self) -> dict:
        c = self.cache
        return {"resident": len(c.where), "slots": self.resident, "hits": c.hits, "misses": c.misses,
                "loaded_bytes": self.loaded_bytes, "evictions": c.evictions, "passes": c.passes,
                "max_resident": self.max_resident, "hit_rate": c.hits / max(c.hits + c.misses, 1),
                "prefetched": self.prefetch_loaded, "prefetched_used": self.prefetch_used}

    def warm(self, n: int) -> None:
        """Make at least n experts resident (the most used so far first, then by index): loads, no compute."""
        with self.lock:
            have = len(self.cache.where)
            if have >= n:
                return
            order = sorted(range(self.num_experts), key=lambda e: (-self.cache.freq.get(e, 0.0), e))
            todo = [e for e in order if e not in self.cache.where][: min(n, self.resident) - have]
            self._apply(self.cache.plan(list(self.cache.where) + todo)[0])

    def prefetch(self, experts: list[int], keep: set[int]) -> None:
        """Load `experts` (not resident) ahead of the pass that will need them, evicting by the policy outside
        `keep`; one expert per lock hold, so passes interleave."""
        for e in experts:
            with self.lock:
                if e in self.cache.where:
                    continue
                slot, old = self.cache.place(e, keep)
                self._apply([(e, slot, old, True)])
                self.prefetched.add(e)
                self.prefetch_loaded += 1

    def _apply(self, wave) -> None:
        """Load a wave's missing experts into their slots (SlotCache.plan decided them)."""
        for e, slot, old, load in wave:
            if not load:
                continue
            if old >= 0:
                self.table[old] = -1
            self.store.load(self.name, e, self.pool_gate_up[slot], self.pool_down[slot])
            self.table[e] = slot
            self.loaded_bytes += self.expert_bytes
        self.max_resident = max(self.max_resident, len(self.cache.where))

    def run(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        drafting = _restrict.handle is not None
        if not drafting and self.pending is not None:  # a verify pass starts once its prefetch has landed
            self.pending.result()
            self.pending = None
        with self.lock:
            return self._run(hidden, ids, weights, drafting)

    def _run(self, hidden, ids, weights, drafting: bool = False):
        flat = ids.reshape(-1)
        needed = sorted(set(flat[flat >= 0].tolist()))  # the pass's one host read
        if needed and needed[-1] >= self.num_experts:
            raise ValueError(f"{self.name}: expert ids must be in [0, {self.num_experts}), got {needed[-1]}")
        if not drafting and self.prefetched:
            self.prefetch_used += len(self.prefetched.intersection(needed))
            self.prefetched.clear()
        if self.trace is not None:
            self.trace.append(needed)
        waves = self.cache.plan(needed, drafting)
        out = None
        for wave in waves:
            self._apply(wave)
            slots = torch.where(ids >= 0, self.table[ids.clamp(min=0)], -1)
            if len(waves) > 1:  # only this wave's experts count in this wave
                in_wave = torch.zeros(self.num_experts + 1, dtype=torch.bool, device=ids.device)
                in_wave[torch.tensor([step[0] for step in wave], device=ids.device)] = True
                slots = torch.where(in_wave[torch.where(ids >= 0, ids, self.num_experts)], slots, -1)
            part = torch.ops.moespec.fused_experts(hidden, slots, weights, self.pool_gate_up, self.pool_down,
                                                   self.activation)
            out = part if out is None else out + part
        return out if out is not None else torch.zeros_like(hidden)


# the table's data pointer -> its block; weak: a model dropped without restore() stops counting as offloaded
_BLOCKS: weakref.WeakValueDictionary[int, OffloadedBlock] = weakref.WeakValueDictionary()


class _Restrict(threading.local):
    def __init__(self):
        self.handle: OffloadHandle | None = None  # resident_only(): drafting passes
        self.prefer: tuple[OffloadHandle, float] | None = None  # prefer_resident(bonus)


_restrict = _Restrict()


def restricting() -> bool:
    """Is an OffloadHandle.resident_only() or prefer_resident() block open in this thread?"""
    return _restrict.handle is not None or _restrict.prefer is not None


def note_wanted(block: str, ids: torch.Tensor) -> None:
    """Inside OffloadHandle.resident_only(): a drafting pass's router wanted `ids` (OffloadHandle.note_wanted)."""
    if _restrict.handle is not None and _restrict.handle.collect_wanted:
        _restrict.handle.note_wanted(block, ids)


def resident_mask(block: str) -> torch.Tensor | None:
    """Inside OffloadHandle.resident_only(): the MoE block's resident experts [E] bool (device), which budgeted
    routing must choose among (moespec::budget_topk); None outside, or for a block the handle did not offload."""
    return _resident(_restrict.handle, block)


def resident_bonus(block: str) -> tuple[float, torch.Tensor] | None:
    """Inside OffloadHandle.prefer_resident(bonus): (bonus, the block's resident experts [E] bool on the device),
    which budgeted routing weighs A's scores by; None outside, or for a block the handle did not offload."""
    h, bonus = _restrict.prefer or (None, 0.0)
    mask = _resident(h, block)
    return (bonus, mask) if mask is not None else None


def _resident(h: OffloadHandle | None, block: str) -> torch.Tensor | None:
    b = h.by_block.get(block) if h is not None else None
    return b.table >= 0 if b is not None else None


def offload_live() -> bool:
    """Is any model's experts offloaded in this process now? (Compiles then keep dynamo's module guards, which tell
    an offloaded instance from an in-memory one of the same class.)"""
    return bool(_BLOCKS)


def block_of(table: torch.Tensor) -> OffloadedBlock | None:
    """The offloaded block whose expert -> slot table `table` is."""
    return _BLOCKS.get(table.data_ptr())  # a live block holds its table: the address is not reused while it lives


@torch.library.custom_op("moespec::offloaded_experts", mutates_args=())
def offloaded_experts(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                      table: torch.Tensor) -> torch.Tensor:
    """The experts of the offloaded block whose expert -> slot table is `table` (a buffer of the experts module, so
    a compiled graph reads the block of the model it runs on) on hidden [T, H] with routing ids [T, k] (-1: empty)
    and weights: missing experts loaded into the block's pool first (moe_spec_compile.offload)."""
    block = block_of(table)
    if block is None:
        raise RuntimeError("moespec::offloaded_experts: this table belongs to no offloaded block (restored?)")
    return block.run(hidden, topk_ids, topk_weights)


@offloaded_experts.register_fake
def _(hidden, topk_ids, topk_weights, table):
    return torch.empty_like(hidden)


# --- finding and checking the experts modules ---------------------------------------------------------------

def _experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    out = []
    for name, m in model.named_modules():
        gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
        if isinstance(gu, torch.nn.Parameter) and isinstance(dn, torch.nn.Parameter) and gu.dim() == 3 \
                and dn.dim() == 3 and gu.shape[0] == dn.shape[0]:
            out.append((name, m))
    return out


def _activation_of(name: str, m: torch.nn.Module) -> str:
    """The activation for which fused_experts over the module's weights equals its own forward (on synthetic tokens,
    fp32): the layout is confirmed, never assumed."""
    if any(getattr(m, b, None) is not None for b in ("gate_up_proj_bias", "down_proj_bias")):
        raise ValueError(f"{name}: experts with biases are not offloaded (moespec offloads gate_up_proj / down_proj "
                         "experts without biases)")
    e, two_i, h = m.gate_up_proj.shape
    if m.down_proj.shape[1:] != (h, two_i // 2) or two_i % 2:
        raise ValueError(f"{name}: gate_up_proj {tuple(m.gate_up_proj.shape)} and down_proj "
                         f"{tuple(m.down_proj.shape)} are not the [E, 2I, H] / [E, H, I] layout moespec offloads")
    g = torch.Generator().manual_seed(0)
    t, k = 6, min(2, e)
    x = torch.randn(t, h, generator=g).to(m.gate_up_proj)
    ids = torch.rand(t, e, generator=g).argsort(-1)[:, :k].to(m.gate_up_proj.device)
    w = (torch.rand(t, k, generator=g) + 0.1).to(m.gate_up_proj)
    with torch.no_grad():
        want = m(x, ids, w).float()
        tol = 1e-3 * max(1.0, want.abs().max().item()) if x.dtype == torch.float32 else 3e-2 * max(
            1.0, want.abs().max().item())
        for act in ACTIVATIONS:
            if act == "swiglu_clamp":
                continue
            got = fused_experts_torch(x, ids, w, m.gate_up_proj, m.down_proj, act).float()
            if (got - want).abs().max().item() <= tol:
                return act
    raise ValueError(f"{name}: no activation moespec knows reproduces this experts module's output: not offloaded")


# --- the public entry point -----------------------------------------------------------------------------------

class OffloadHandle:
    """What offload_experts did: .blocks (name -> OffloadedBlock), .stats(), .restore()."""

    def __init__(self, model, blocks: dict[str, OffloadedBlock], modules: dict[str, torch.nn.Module], store: Store):
        self.model, self.blocks, self._modules, self.store = model, blocks, modules, store
        # the MoE block (the experts module's parent, as budgets and recorded events name it) -> its offloaded experts
        self.by_block = {name.rsplit(".", 1)[0] if "." in name else name: b for name, b in blocks.items()}
        self._wanted: dict[str, torch.Tensor] = {}  # block -> [E] fp32: how many drafted tokens wanted each expert
        self._pool = None  # the prefetch worker, made on first use
        self.collect_wanted = False  # note_wanted keeps drafting passes' wanted experts (SelfDrafter)
        self.restored = False

    def stats(self) -> dict:
        """block (the MoE block, the experts module's parent) -> resident, hits, misses, loaded_bytes, ..."""
        return {name: b.stats() for name, b in self.by_block.items()}

    @contextlib.contextmanager
    def resident_only(self):
        """Inside: budgeted routing of these blocks (moespec-compiled passes under a budget) chooses only among
        the resident experts, so nothing loads (the self-drafter's passes, speculative.SelfDrafter)."""
        saved, _restrict.handle = _restrict.handle, self
        try:
            yield
        finally:
            _restrict.handle = saved

    @contextlib.contextmanager
    def prefer_resident(self, bonus: float = 1.0):
        """Inside: a budget's expert scores count (1 + bonus) times for experts resident in the pool, so A (the C
        experts a budgeted pass may use) takes a resident expert over one that must load unless that one's score is
        more than 1 + bonus times higher. Only budgeted passes change (msc.budget, the decoder's budget=C), within
        what their budget allows; exact passes are untouched. Measured in benchmarks/results/offload_cpu.md."""
        if isinstance(bonus, bool) or not isinstance(bonus, int | float) or not 0 < bonus < float("inf"):
            raise ValueError(f"bonus must be a positive finite number, got {bonus!r}")
        saved, _restrict.prefer = _restrict.prefer, (self, float(bonus))
        try:
            yield
        finally:
            _restrict.prefer = saved

    def note_wanted(self, block: str, ids: torch.Tensor) -> None:
        """A drafting pass's router wanted experts `ids` [T, k] (its tokens' own top-k, before the resident-only
        restriction): counted on the device (no host read) for hint() and prefetch()."""
        b = self.by_block.get(block)
        if b is None:
            return
        m = self._wanted.get(block)
        if m is None:
            m = self._wanted[block] = torch.zeros(b.num_experts, dtype=torch.float32, device=b.table.device)
        flat = ids.reshape(-1)
        m.index_add_(0, flat, torch.ones(flat.shape, dtype=m.dtype, device=m.device))

    def hint(self) -> dict[str, list[int]]:
        """Pass what the drafting passes wanted since the last call to each layer's eviction policy (their draft
        scores, SlotCache.hint), no loads -> block -> those experts, most wanted first. One host read per block."""
        out = {}
        for block, m in self._wanted.items():
            counts = m.tolist()
            m.zero_()
            top = max(counts)
            if top <= 0:
                continue
            b = self.by_block[block]
            with b.lock:
                b.cache.hint({e: c / top for e, c in enumerate(counts) if c > 0})
            out[block] = sorted((e for e, c in enumerate(counts) if c > 0), key=lambda e: -counts[e])
        return out

    def prefetch(self, cap: int | None = None) -> None:
        """hint(), and start loading, in a worker thread, the experts the draft's routing wanted that the pool lacks,
        most wanted first, at most `cap` per layer (None: as many as the pool holds beside the wanted experts already
        resident, which are kept); the next pass that is not a drafting pass waits for them."""
        for block, wanted in self.hint().items():
            b = self.by_block[block]
            keep = {e for e in wanted if e in b.cache.where}
            room = b.resident - len(keep)
            todo = [e for e in wanted if e not in keep][: room if cap is None else min(cap, room)]
            if not todo:
                continue
            if b.pending is not None:
                b.pending.result()
            b.pending = self._worker().submit(b.prefetch, todo, keep)

    def _worker(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moespec-prefetch")
        return self._pool

    def record_trace(self, on: bool = True) -> None:
        """Start (anew) or stop keeping each block's per-pass needed experts (.traces())."""
        for b in self.blocks.values():
            b.trace = [] if on else None

    def traces(self) -> dict[str, list[list[int]]]:
        """block -> the experts each pass needed, in order, since record_trace() (for policy simulations)."""
        return {name: list(b.trace or []) for name, b in self.by_block.items()}

    def restore(self) -> None:
        """Put every expert weight back into the model (on the compute device) and undo the offload."""
        if self.restored:
            return
        for b in self.blocks.values():
            if b.pending is not None:
                b.pending.result()
        if self._pool is not None:
            self._pool.shutdown()
        for name, m in self._modules.items():
            b = self.blocks[name]
            gu, dn = self.store.full(name)
            dev = b.pool_gate_up.device
            m.gate_up_proj = torch.nn.Parameter(gu.to(dev).clone(), requires_grad=False)
            m.down_proj = torch.nn.Parameter(dn.to(dev).clone(), requires_grad=False)
            del m.forward  # the class's own forward again
            m._moespec_offload = None
            del m.expert_slots
        if getattr(self.model, "_moespec_offload_handle", None) is self:
            self.model._moespec_offload_handle = None
        for key in [key for key, b in _BLOCKS.items() if b in self.blocks.values()]:
            del _BLOCKS[key]
        self.store.close()
        self.restored = True
        torch._dynamo.reset()  # graphs traced with or through the offload (see offload_experts)


def _resident_count(resident, e: int, name: str) -> int:
    if isinstance(resident, bool) or not isinstance(resident, int | float):
        raise ValueError(f"resident must be an int in [1, E] or a share of E in (0, 1], got {resident!r}")
    if isinstance(resident, int):
        if not 1 <= resident <= e:
            raise ValueError(f"resident={resident} is outside [1, {e}] for {name} ({e} experts)")
        return resident
    if not 0 < resident <= 1:
        raise ValueError(f"resident share must be in (0, 1], got {resident}")
    return max(1, round(resident * e))


def offload_experts(model: torch.nn.Module, resident, store="host", policy: str = "lfu") -> OffloadHandle:
    """Move every experts module's weights of `model` to `store`, keep `resident` experts per layer in a pool on
    the compute device (an int in [1, E], or a share of E in (0, 1]). Everything is checked before the model changes:
    a model without offloadable experts, R out of range, an unknown policy or a store without room is a ValueError
    and the model is left as it was."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    done = [name for name, m in model.named_modules() if getattr(m, "_moespec_offload", None) is not None]
    if done:
        raise ValueError(f"{done[0]} is offloaded already (handle.restore() first)")
    found = _experts_modules(model)
    if not found:
        raise ValueError(f"{type(model).__name__} holds no experts module moespec can offload (stacked gate_up_proj "
                         "[E, 2I, H] and down_proj [E, H, I] parameters)")
    plans = []
    for name, m in found:
        plans.append((name, m, _resident_count(resident, m.gate_up_proj.shape[0], name), _activation_of(name, m)))
    store = _make_store(store)
    store.check_room(sum(m.gate_up_proj.nbytes + m.down_proj.nbytes for _, m in found), found[0][1].gate_up_proj.device)
    blocks, modules = {}, {}
    for name, m, r, act in plans:
        gu, dn = m.gate_up_proj, m.down_proj
        store.put(name, gu, dn)
        blocks[name] = OffloadedBlock(
            name, gu.shape[0], r, act, store, SlotCache(r, policy),
            torch.empty((r, *gu.shape[1:]), dtype=gu.dtype, device=gu.device),
            torch.empty((r, *dn.shape[1:]), dtype=dn.dtype, device=dn.device),
            torch.full((gu.shape[0],), -1, dtype=torch.long, device=gu.device))
        modules[name] = m
    if hasattr(store, "finish"):
        store.finish()
    for name, m, _r, _act in plans:
        b = blocks[name]
        _BLOCKS[b.table.data_ptr()] = b
        del m.gate_up_proj, m.down_proj  # the weights live in the store now (and R of them in the pool)
        m.register_buffer("expert_slots", b.table, persistent=False)
        m.forward = _offloaded_forward(m)
        m._moespec_offload = b
    # The decoder's compiles skip dynamo's guards on modules except while an offload is live (offload_live(),
    # speculative.buckets.compile_pass): graphs traced before, without them, must not serve this model.
    torch._dynamo.reset()
    handle = OffloadHandle(model, blocks, modules, store)
    model._moespec_offload_handle = handle  # for SelfDrafter(model)
    return handle


def _offloaded_forward(module: torch.nn.Module):
    def forward(hidden_states, top_k_index, top_k_weights):
        return torch.ops.moespec.offloaded_experts(hidden_states, top_k_index, top_k_weights, module.expert_slots)

    return forward
