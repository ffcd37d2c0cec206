"""esamp::capture -- the engine capture point (out[:N] = hidden + residual)."""
import pytest
import torch
from torch.library import opcheck

import esamp

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("hd", DTYPES)
@pytest.mark.parametrize("od", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_capture_matches_add(hd, od, with_residual):
    g = torch.Generator().manual_seed(0)
    big = torch.randn(7, 600, generator=g).to(hd)
    hidden = big[:, :577]  # strided rows
    residual = torch.randn(7, 577, generator=g).to(hd) if with_residual else None
    out = torch.full((9, 577), 7.0, dtype=od)
    esamp.ops.capture(hidden, residual, out)
    ref = hidden.float() + (residual.float() if residual is not None else 0)
    torch.testing.assert_close(out[:7], ref.to(od), rtol=0, atol=0)
    assert (out[7:] == 7.0).all()  # rows past N untouched


def test_capture_opcheck_and_compile():
    h, r, out = torch.randn(3, 8), torch.randn(3, 8), torch.zeros(4, 8)
    opcheck(torch.ops.esamp.capture, (h, r, out))
    opcheck(torch.ops.esamp.capture, (h, None, out))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(h, r, out):
        esamp.ops.capture(h, r, out)
        return h * 2

    out2 = torch.zeros(4, 8)
    f(h, r, out2)
    torch.testing.assert_close(out2[:3], h + r)


@pytest.mark.parametrize("args,match", [
    (lambda: (torch.randn(3), None, torch.zeros(3, 4)), "hidden"),
    (lambda: (torch.randn(3, 4), None, torch.zeros(2, 4)), "out"),
    (lambda: (torch.randn(3, 4), None, torch.zeros(3, 5)), "out"),
    (lambda: (torch.randn(3, 4), torch.randn(3, 5), torch.zeros(3, 4)), "residual"),
    (lambda: (torch.randn(3, 4).long(), None, torch.zeros(3, 4)), "hidden"),
    (lambda: (torch.randn(4, 3).t(), None, torch.zeros(3, 4)), "hidden"),
])
def test_capture_bad_input(args, match):
    with pytest.raises(RuntimeError, match=match):
        esamp.ops.capture(*args())
