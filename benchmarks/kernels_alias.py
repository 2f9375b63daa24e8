"""Benchmarks run from a bare checkout on the GPU machine (no installed package): map kernels/ to routelens.kernels."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def alias_kernels() -> None:
    """``kernels/`` is installed as ``routelens.kernels``; on a bare checkout (the GPU machine) map it by hand."""
    import importlib.util

    import routelens

    if importlib.util.find_spec("routelens.kernels") is None:
        root = Path(__file__).resolve().parent.parent / "kernels"
        spec = importlib.util.spec_from_file_location("routelens.kernels", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["routelens.kernels"] = module
        spec.loader.exec_module(module)
        routelens.kernels = module
