"""Speculation-aware decoding, one core for every batch size: draft trees, tree verification under an expert budget,
KV compaction, one CUDA graph per pass shape (rows bucket x tree bucket) serving every budget (budgets are device data).

    prompts [B, L] --prefill (exact)--> roots [R]                                      decoder.py
    loop:  drafter.draft(roots) -> DraftTree [R, n]                                    drafters.py, tree.py
           -> pad to N, node weights, one verify pass [R, N] under budget C            buckets.py, weights.py, kv.py
              (+ the target's hidden states a drafter names in feature_layers: EAGLE-3)  ../eagle3.py
           -> accept a path + bonus per row (one host read)                            accept.py
           -> compact the KV caches (target's and drafter's) -> next roots; finished rows leave the pass
    tree="auto" / budget="auto": the controller picks (shape, C) per step              controller.py
    -> GenerateOutput(sequences [B, L + new], GenerateStats with a per-row view)      stats.py
"""

from .accept import Acceptance, SamplingConfig
from .controller import Controller, Decision
from .decoder import GenerateOutput, SpeculativeDecoder
from .drafters import Drafter, ModelDrafter, NgramDrafter, OracleDrafter, RowDrafter, SelfDrafter
from .stats import GenerateStats, RowStats, VerifyStats
from .tree import DraftTree, StaticTree, TreeSpec

__all__ = [
    "SpeculativeDecoder",
    "GenerateOutput",
    "GenerateStats",
    "VerifyStats",
    "RowStats",
    "Acceptance",
    "SamplingConfig",
    "Controller",
    "Decision",
    "Drafter",
    "RowDrafter",
    "ModelDrafter",
    "NgramDrafter",
    "OracleDrafter",
    "SelfDrafter",
    "DraftTree",
    "StaticTree",
    "TreeSpec",
]
