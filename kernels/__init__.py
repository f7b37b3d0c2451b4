"""Triton kernels of moespec, installed as moe_spec_compile.kernels (the CUDA implementation of the ops).

routing -> align by expert -> gate_up GEMM + act -> down GEMM x weight -> combine   (fused_moe.py)

Importing this package imports Triton; where Triton is missing the ImportError propagates and
moespec::fused_experts falls back to its torch implementation.

Imported by the top-level name `kernels` (the repository root on sys.path: `python -c`, a REPL or a
script in the root), this folder is not ours to give: that name belongs to the Hugging Face kernels
hub package, which transformers probes for (`is_kernels_available` imports `kernels` and reads its
`__version__`). Then this module hands the name to the hub package when one is installed, and
otherwise stays empty and versionless, which transformers reads as "not installed".
"""

import sys as _sys

if __name__ == "kernels":

    def _defer_to_hub_package() -> None:
        """Load an installed `kernels` package found elsewhere on sys.path in place of this folder."""
        import importlib.machinery
        import importlib.util
        import os

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in _sys.path if os.path.abspath(p or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec("kernels", path)
        if spec is None or spec.loader is None:
            return
        module = importlib.util.module_from_spec(spec)
        _sys.modules["kernels"] = module  # the import statement returns what sys.modules holds
        spec.loader.exec_module(module)

    __all__: list[str] = []
    _defer_to_hub_package()
else:
    from .config import ENV_VAR
    from .fused_moe import fused_experts, select_config
    from .routing import RoutingMeta, align_by_expert

    __all__ = ["fused_experts", "select_config", "align_by_expert", "RoutingMeta", "ENV_VAR"]
