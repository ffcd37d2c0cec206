"""Philox4x32-10 and the Gumbel noise of SPEC 4: known answers for the Python reference and for the C++
implementation (through the benchmark binary's self-test, and through esamp.ops.reweight, whose
tokens at beta = 0 are argmax(l + g) with g the noise of the C++ side)."""
import math
import os
import subprocess

import numpy as np
import pytest
import torch

import esamp
from esamp.reference import sampling as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SPEC 4 known answers.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
]

# (seed, step) pairs that exercise both key words, both step words and negative int64 values.
SEED_STEPS = [(0, 0), (1, 0), (0, 1), (12345, 678), (2**32 + 7, 3), (5, 2**32 + 9), (-1, -1), (-(2**63), 2**63 - 1),
              (0x0123456789ABCDEF, 0x7EDCBA9876543210), (987654321987, 42)]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_reference_philox_known_answers(ctr, key, want):
    got = ref.philox4x32_10(np.array(ctr, dtype=np.uint32), key)
    assert [int(x) for x in got] == list(want)


def test_reference_philox_vectorised_matches_scalar():
    rng = np.random.default_rng(0)
    ctr = rng.integers(0, 2**32, size=(50, 4), dtype=np.uint64)
    key = rng.integers(0, 2**32, size=(50, 2), dtype=np.uint64)
    batched = ref.philox4x32_10(ctr, (key[:, 0], key[:, 1]))
    for i in range(50):
        one = ref.philox4x32_10(ctr[i], (int(key[i, 0]), int(key[i, 1])))
        assert np.array_equal(batched[i], one)


def test_reference_gumbel_uses_counter_layout_of_spec():
    # g(seed, step, v) must come from word v & 3 of philox((v >> 2, step lo, step hi, TAG), (seed lo, seed hi)).
    seed, step = 0x0123456789ABCDEF, 0x7EDCBA9876543210
    v = np.arange(4 * 3 + 2)
    words = ref.philox4x32_10(
        np.stack([v >> 2, np.full_like(v, step & 0xFFFFFFFF), np.full_like(v, step >> 32),
                  np.full_like(v, ref.GUMBEL_TAG)], axis=-1).astype(np.uint64),
        (seed & 0xFFFFFFFF, seed >> 32))
    w = words[np.arange(v.shape[0]), v & 3].astype(np.uint64)
    u64 = ((w >> np.uint64(8)).astype(np.float64) + 0.5) * 2.0**-24
    g64 = -np.log(-np.log(u64))
    g = ref.gumbel_noise(seed, step, v)
    assert g.dtype == np.float32
    # float32 rounding of u and of the two logs: |g32 - g64| is a few float32 ulps of the intermediates.
    assert np.max(np.abs(g.astype(np.float64) - g64)) < 1e-5
    # Element-wise calls agree with the batched call.
    for i in range(v.shape[0]):
        assert ref.gumbel_noise(seed, step, int(v[i])) == g[i]


def test_reference_uniform_edges():
    u = ref.uniform_from_words(np.array([0, 255, 256, 0xFFFFFF00, 0xFFFFFFFF], dtype=np.uint64))
    assert u.dtype == np.float32
    assert u[0] == np.float32(2.0**-25) and u[1] == u[0]
    assert u[2] == np.float32(3 * 2.0**-25)
    assert np.all((u > 0) & (u < 1))
    assert np.all(np.isfinite(-np.log(-np.log(u.astype(np.float64)))))


def test_reference_gumbel_moments():
    # Gumbel(0, 1): mean = Euler-Mascheroni gamma, variance = pi^2 / 6.  N = 2^17 draws: the standard error
    # of the mean is 1.28 / sqrt(N) = 0.0035; we allow 5 standard errors (false alarm < 1e-6).
    N = 1 << 17
    g = ref.gumbel_noise(2024, 7, np.arange(N)).astype(np.float64)
    se = math.pi / math.sqrt(6) / math.sqrt(N)
    assert abs(g.mean() - 0.5772156649) < 5 * se
    assert abs(g.var() - math.pi**2 / 6) < 0.05


def _bench_binary():
    """ESAMP_BUILD_DIR if set, else the developer build (build/dev) or CI's benchmark build (build/bench)."""
    if os.environ.get("ESAMP_BUILD_DIR"):
        dirs = [os.environ["ESAMP_BUILD_DIR"]]
    else:
        dirs = [os.path.join(ROOT, "build", d) for d in ("dev", "bench")]
    for d in dirs:
        exe = os.path.join(d, "bench_reweight_cpu")
        if os.path.exists(exe):
            return exe, dirs
    return None, dirs


def test_cpp_philox_known_answers_via_bench_selftest():
    exe, looked = _bench_binary()
    if exe is None:
        # .ci/run builds it: under CI=true / ESAMP_REQUIRE, tests/conftest.py turns this skip into an error.
        pytest.skip(f"C++ benchmark binary bench_reweight_cpu not found in {looked} (set ESAMP_BUILD_DIR)")
    res = subprocess.run([exe, "--selftest"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "philox known answers: ok" in res.stdout


@pytest.mark.parametrize("seed,step", SEED_STEPS)
def test_cpp_gumbel_matches_reference_through_reweight(seed, step):
    # beta = 0, T = 1, no filter, l = 0: the token is argmax_v g(seed, step, v) over all V (V = 37, not a
    # multiple of 4), and the logprob is -log V.
    V = 37
    logits = torch.zeros(1, V)
    pred = torch.zeros(1, 1)
    W = torch.zeros(V, 1)
    s = torch.tensor([seed], dtype=torch.int64)
    t = torch.tensor([step], dtype=torch.int64)
    tok, lp = esamp.ops.reweight(logits, pred, W, beta=0.0, seed=s, step=t)
    g = ref.gumbel_noise(seed, step, np.arange(V)).astype(np.float64)
    top2 = np.sort(g)[-2:]
    assert top2[1] - top2[0] > 1e-4, "reference noise has a near tie; pick another (seed, step)"
    assert int(tok) == int(np.argmax(g))
    assert abs(float(lp) + math.log(V)) < 1e-6


@pytest.mark.parametrize("seed,step", SEED_STEPS[:6])
def test_cpp_gumbel_matches_reference_on_every_token(seed, step):
    # l_v = ramp_v - g_ref(v): if the kernel's noise equals the reference noise for EVERY v, then
    # l_v + g_v = ramp_v up to float32 rounding (< 1e-5 here), so the token is the top of the ramp.  A
    # single token whose noise differs by more than the ramp step (1e-3) can take the argmax instead.
    V = 4099
    g = ref.gumbel_noise(seed, step, np.arange(V))
    ramp = (np.arange(V) * 1e-3).astype(np.float32)
    logits = torch.from_numpy((ramp - g).astype(np.float32))[None, :]
    tok, _ = esamp.ops.reweight(logits, torch.zeros(1, 1), torch.zeros(V, 1), beta=0.0,
                                seed=torch.tensor([seed]), step=torch.tensor([step]))
    assert int(tok) == V - 1
    # And the permutation of the ramp (reverse it): the token must move to v = 0.
    logits_rev = torch.from_numpy((ramp[::-1] - g).astype(np.float32))[None, :]
    tok, _ = esamp.ops.reweight(logits_rev, torch.zeros(1, 1), torch.zeros(V, 1), beta=0.0,
                                seed=torch.tensor([seed]), step=torch.tensor([step]))
    assert int(tok) == 0
