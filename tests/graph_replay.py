"""CUDA-graph replay emulated on the CPU, for the decoder's graph paths (buckets.VerifyRunner), which CI never runs on
a GPU: "capture" runs the call once; replay() reruns it, and the call reads only the runner's static buffers (as a
captured graph does), then writes into the outputs the capture returned (as a graph rewrites its output storage).
What it catches: inputs that do not reach the static buffers, outputs read after the next replay overwrote them. What
it cannot: anything of the device itself (streams, pools, kernels).
"""

from __future__ import annotations

import torch

import moe_spec_compile.speculative.buckets as buckets


class ReplayedCall:
    def __init__(self, run):
        self.run = run
        self.out = run()

    def replay(self) -> None:
        new = self.run()
        for dst, src in zip(*(x if isinstance(x, tuple) else (x,) for x in (self.out, new))):
            dst.copy_(src)


def emulate_cuda_graphs(monkeypatch) -> None:
    """Runners made with use_graphs=True (set it on a runner, or a ModelDrafter's cuda_graphs) replay this way."""
    def capture(run, pool):
        graph = ReplayedCall(run)
        return graph, graph.out

    monkeypatch.setattr(buckets, "capture_graph", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
