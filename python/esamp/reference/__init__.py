"""Plain-PyTorch reference implementations of every esamp operator (float32/float64 math).

They define the semantics the kernels are tested against, and are the eager baselines of the
benchmarks.  Slow by design; never used on a hot path.
"""
