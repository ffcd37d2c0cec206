"""scikit-build-core metadata provider: the wheel's runtime requirement on torch is the torch it is built against.

esamp's _C.so links libtorch's C++ API, which is tied to one torch release (and C++ ABI, and CUDA major for CUDA
kernels), so a built wheel works with exactly that release: its metadata says `torch==X.Y.Z` (any local tag, e.g.
+cu130 or +cpu, matches; the CUDA major is checked at import by esamp/_ops.py).  A source build pins whatever torch
is installed in the build environment (`pip install --no-build-isolation .` uses yours).
"""
from __future__ import annotations


def dynamic_metadata(field, settings=None, project=None):
    if field != "dependencies":
        raise RuntimeError(f"esamp_torch_pin provides 'dependencies' only, not {field!r}")
    import torch

    release = torch.__version__.split("+", 1)[0]
    return [f"torch=={release}"] + list((settings or {}).get("extra", []))
