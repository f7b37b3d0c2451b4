"""Speculation-aware decoding: draft trees, tree verification under an expert budget, KV compaction,
one CUDA graph per tree-size bucket serving every budget (budgets are device data).

prompt -> prefill (exact) -> [draft tree -> verify (budget C) -> accept path + bonus -> compact KV]*
"""

from .accept import SamplingConfig
from .batched import BatchGenerateStats, BatchVerifyStats
from .controller import Controller, Decision
from .decoder import GenerateOutput, GenerateStats, SpeculativeDecoder, VerifyStats
from .drafters import Drafter, ModelDrafter, NgramDrafter, OracleDrafter
from .tree import DraftTree, StaticTree, TreeSpec

__all__ = [
    "SpeculativeDecoder",
    "GenerateOutput",
    "GenerateStats",
    "VerifyStats",
    "BatchGenerateStats",
    "BatchVerifyStats",
    "SamplingConfig",
    "Controller",
    "Decision",
    "Drafter",
    "ModelDrafter",
    "NgramDrafter",
    "OracleDrafter",
    "DraftTree",
    "StaticTree",
    "TreeSpec",
]
