"""FX graph passes of the moespec backend (installed as moe_spec_compile.passes); pipeline.py runs them:

    gm --discover--> routers (top-k + post-processing) and their experts regions, or Declined(reason)
       --experts---> fused_experts over the model's own weights where one layout is confirmed
       --budget----> budget_topk / budget_apply around every router understood

Counts go to torch._dynamo.utils.counters["moespec"].
"""

from .graph_utils import Declined
from .pipeline import BlockReport, run_passes

__all__ = ["BlockReport", "Declined", "run_passes"]
