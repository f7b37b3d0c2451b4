"""FX graph passes of the moespec backend (installed as moe_spec_compile.passes); pipeline.py runs them:

    gm --discover--> routers (top-k + post-processing) and their experts regions, or Declined(reason)
       --experts---> fused_experts over the model's own weights where one layout is confirmed
       --budget----> budget_topk / budget_apply around every router understood

and, for inductor on the CPU, lower.py: a copy of the result whose moespec ops run as plain tensor code (the
backend compiles it; the graph above stays for the passes that need the host).

Counts go to torch._dynamo.utils.counters["moespec"].
"""

from .graph_utils import Declined
from .pipeline import BlockReport, run_passes

__all__ = ["BlockReport", "Declined", "run_passes"]
