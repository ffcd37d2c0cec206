"""esamp::mix_hidden (latent mixing, SPEC 3): (1 + beta) h - beta t in float32 math, output in h's dtype."""
import pytest
import torch

import esamp
from esamp.reference import sampling as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DNAME = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def _check(out, h, t, beta):
    """Kernel and reference both compute (1 + b) h - b t in float32 and round once to h's dtype, so they may
    differ by at most one rounding of the output: |out - ref| <= eps(dtype) * |ref| (plus the float32
    roundings of the three operations, 3 * 2^-24 * (|(1+b) h| + |b t|), which matter only for float32)."""
    want = ref.mix_hidden(h, t, beta)
    assert out.dtype == h.dtype and out.shape == h.shape and out.is_contiguous()
    b = torch.as_tensor(beta, dtype=torch.float32)
    b = b[:, None] if b.dim() == 1 else b
    scale = ((1 + b) * h.float()).abs() + (b * t.float()).abs()
    eps = torch.finfo(h.dtype).eps
    tol = eps * want.float().abs() + 3 * 2.0**-24 * scale
    err = (out.float() - want.float()).abs()
    assert bool((err <= tol).all()), f"max err {float(err.max())}"
    return err


@pytest.mark.parametrize("hdt", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("pdt", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("B,H", [(1, 577), (64, 577), (5, 1)])
def test_mix_hidden_matches_reference(hdt, pdt, B, H):
    g = torch.Generator().manual_seed(B * H)
    h = torch.randn(B, H, generator=g).to(hdt)
    t = torch.randn(B, H, generator=g).to(pdt)
    for beta in (0.0, 0.25, 1.0):
        out = esamp.ops.mix_hidden(h, t, beta=beta)
        _check(out, h, t, beta)
        if beta == 0.0:
            assert torch.equal(out, h)


def test_mix_hidden_per_row_beta_and_layouts():
    g = torch.Generator().manual_seed(3)
    B, H = 8, 577
    big_h = torch.randn(2 * B, H + 9, generator=g).to(torch.bfloat16)
    big_t = torch.randn(B, H + 4, generator=g)
    h, t = big_h[::2, :H], big_t[:, :H]
    assert not h.is_contiguous() and not t.is_contiguous()
    beta = torch.linspace(0.0, 2.0, B)
    out = esamp.ops.mix_hidden(h, t, beta=beta)
    _check(out, h, t, beta)
    assert torch.equal(out, esamp.ops.mix_hidden(h.contiguous(), t.contiguous(), beta=beta))
    # Each row uses its own beta.
    for r in range(B):
        assert torch.equal(out[r:r + 1], esamp.ops.mix_hidden(h[r:r + 1], t[r:r + 1], beta=float(beta[r])))


def test_mix_hidden_empty_and_bad_input():
    out = esamp.ops.mix_hidden(torch.empty(0, 4), torch.empty(0, 4), beta=0.5)
    assert out.shape == (0, 4)
    h = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="pred_hidden"):
        esamp.ops.mix_hidden(h, torch.randn(3, 5))
    with pytest.raises(ValueError, match="beta"):
        esamp.ops.mix_hidden(h, h, beta=-1.0)
    with pytest.raises(ValueError, match="beta"):
        esamp.ops.mix_hidden(h, h, beta=torch.ones(2))
    with pytest.raises(RuntimeError, match="beta"):
        esamp.ops.mix_hidden(h, h, beta=torch.tensor([0.1, -0.2, 0.3]))
    with pytest.raises(RuntimeError, match="hidden"):
        esamp.ops.mix_hidden(h.to(torch.int32), h)


@pytest.mark.parametrize("dt", DTYPES, ids=DNAME.get)
def test_mix_hidden_opcheck(dt):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 9, generator=g).to(dt)
    t = torch.randn(4, 9, generator=g)
    torch.library.opcheck(torch.ops.esamp.mix_hidden.default, (h, t, torch.tensor([0.0, 0.25, 1.0, 2.0])))
