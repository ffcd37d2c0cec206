"""CPU sampling kernels round every product and sum (issue 12, item 8).

csrc/cpu/sampling_cpu.cpp is compiled for three x86-64 levels (target_clones) and picked at load time.  GCC
contracts a * b + c into a fused multiply-add in the AVX2 / AVX-512 clones only, which made CPU results depend
on the machine.  The file is now compiled with -ffp-contract=off, so every clone computes exactly the
documented float32 operations.  This test checks the mixed logits of reweight_logits bit for bit against a
numpy emulation of those operations (numpy never fuses): the candidate dot product in 16 lanes (product
rounded, then sum rounded, per lane), the tail zero-padded, the lanes summed pairwise (8, 4, 2, 1), then
d + b, and m = ((1 + beta) l - beta d) / T with each operation rounded.  On a machine with FMA (every AVX2
machine, like the project's) a contracted build fails this test.
"""
import numpy as np
import pytest
import torch

import esamp
from esamp import ops

F32 = np.float32


def _dot16(w, p):
    H = w.shape[0]
    acc = np.zeros(16, F32)
    i = 0
    while i + 16 <= H:
        acc = (acc + (w[i:i + 16] * p[i:i + 16]).astype(F32)).astype(F32)
        i += 16
    if i < H:
        tw = np.zeros(16, F32)
        tp = np.zeros(16, F32)
        tw[:H - i] = w[i:]
        tp[:H - i] = p[i:]
        acc = (acc + (tw * tp).astype(F32)).astype(F32)
    a = acc.copy()
    for k in (8, 4, 2, 1):
        a[:k] = (a[:k] + a[k:2 * k]).astype(F32)
    return F32(a[0])


def _mixed_reference(l, pred, W, b, beta, T):
    B, V = l.shape
    out = np.empty((B, V), F32)
    for r in range(B):
        one_b = F32(F32(1.0) + F32(beta[r]))
        for v in range(V):
            d = _dot16(W[v], pred[r])
            if b is not None:
                d = F32(d + b[v])
            m = F32(F32(F32(one_b * l[r, v]) - F32(F32(beta[r]) * d)) / F32(T[r]))
            out[r, v] = m
    return out


@pytest.mark.parametrize("wdtype,bias,H", [(torch.float32, False, 77), (torch.bfloat16, True, 64),
                                           (torch.float32, True, 5)])
def test_cpu_mixed_logits_are_the_uncontracted_float32_operations(wdtype, bias, H):
    # V < 1024: the candidate (sparse) path of the CPU kernel, whose arithmetic is fully specified
    g = torch.Generator().manual_seed(3)
    B, V = 3, 301
    logits = torch.randn(B, V, generator=g) * 4
    pred = torch.randn(B, H, generator=g)
    W = (torch.randn(V, H, generator=g) / H ** 0.5).to(wdtype)
    b = (torch.randn(V, generator=g) * 0.1) if bias else None
    beta = torch.tensor([0.25, 0.7, 1.3])
    T = torch.tensor([1.0, 0.7, 1.9])
    got = ops.reweight_logits(logits, pred, W, lm_head_bias=b, beta=beta, temperature=T).numpy()
    want = _mixed_reference(logits.numpy(), pred.numpy(), W.float().numpy(), None if b is None else b.numpy(),
                            beta.numpy(), T.numpy())
    assert got.dtype == np.float32 and np.isfinite(got).all()
    diff = np.nonzero(got.view(np.uint32) != want.view(np.uint32))
    assert diff[0].size == 0, (f"{diff[0].size} of {B * V} mixed logits differ from the uncontracted float32 "
                               f"operations, e.g. row {diff[0][0]} token {diff[1][0]}: "
                               f"{got[diff[0][0], diff[1][0]]!r} vs {want[diff[0][0], diff[1][0]]!r}")


def test_cpu_sampled_tokens_follow_the_uncontracted_mixed_logits():
    # the sampled token is argmax(m + g) over the same bits: same seed -> the token of the reference m
    from esamp.reference import sampling as ref
    g = torch.Generator().manual_seed(4)
    B, V, H = 4, 257, 40
    logits = torch.randn(B, V, generator=g) * 3
    pred = torch.randn(B, H, generator=g)
    W = torch.randn(V, H, generator=g) / H ** 0.5
    beta, T = torch.full((B,), 0.4), torch.full((B,), 0.9)
    seeds = esamp.ops.derive_row_seeds(9, B)
    tok, _ = ops.reweight(logits, pred, W, beta=beta, temperature=T, seed=seeds, step=5)
    m = _mixed_reference(logits.numpy(), pred.numpy(), W.numpy(), None, beta.numpy(), T.numpy())
    for r in range(B):
        gn = ref.gumbel_noise(int(seeds[r]), 5, np.arange(V))
        key = (m[r] + gn).astype(F32)
        assert int(tok[r]) == int(np.argmax(key)), r
