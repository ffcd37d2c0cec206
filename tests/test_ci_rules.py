"""tests/conftest.py's CI rules, on a scratch suite run by pytest in a subprocess: in strict mode (CI=true or
ESAMP_REQUIRE) a skip is an error unless it is a GPU skip; module-level skips become collection errors without
stopping the rest; a missing required dependency stops the session; GPU skips are counted in the summary line."""
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

SUITE = {
    "test_a.py": """
import pytest

def test_runs():
    assert 1 + 1 == 2

@pytest.mark.skipif(True, reason="needs a CUDA device (scratch)")
def test_gpu_only():
    pass

def test_dependency_skip():
    pytest.skip("optional thing not installed")
""",
    "test_b.py": """
import pytest
pytest.skip("module dependency not importable", allow_module_level=True)

def test_never():
    pass
""",
    "test_c.py": """
def test_after_the_module_skip():
    assert True
""",
}


def _run(tmp_path, env_extra, *args):
    for name, src in SUITE.items():
        (tmp_path / name).write_text(src)
    shutil.copy(os.path.join(HERE, "conftest.py"), tmp_path / "conftest.py")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "ESAMP_REQUIRE", "PYTEST_ADDOPTS")}
    env["CUDA_VISIBLE_DEVICES"] = ""        # the scratch suite's GPU skip is a GPU skip only without a GPU
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *args],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


def test_local_run_skips_and_counts_gpu_skips_apart(tmp_path):
    rc, out = _run(tmp_path, {})
    assert rc == 0, out
    last = out.strip().splitlines()[-1]
    assert "2 passed" in last and "2 skipped," in last and "1 skipped (no GPU)" in last, last


@pytest.mark.parametrize("env", [{"CI": "true"}, {"ESAMP_REQUIRE": "transformers"}])
def test_strict_mode_turns_non_gpu_skips_into_errors(tmp_path, env):
    rc, out = _run(tmp_path, env)
    assert rc == 1, out
    last = out.strip().splitlines()[-1]
    # test_c.py still ran after test_b.py's module-level skip became a collection error.
    assert "2 passed" in last and "1 failed" in last and "1 error" in last and "1 skipped (no GPU)" in last, last
    assert "only GPU tests may skip" in out and "optional thing not installed" in out
    assert "module dependency not importable" in out


def test_ci_false_is_not_strict(tmp_path):
    rc, out = _run(tmp_path, {"CI": "false"})
    assert rc == 0, out


def test_missing_required_dependency_stops_the_session(tmp_path):
    rc, out = _run(tmp_path, {"ESAMP_REQUIRE": "vllm,nosuchdep"})
    assert rc != 0 and "unknown dependency ['nosuchdep']" in out, out
    # A requirement that is certainly missing: registered in the scratch copy of the conftest.
    with open(tmp_path / "conftest.py", "a") as f:
        f.write('\nREQUIREMENTS["scratch"] = lambda: "the scratch thing is missing: pip install scratch"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "ESAMP_REQUIRE", "PYTEST_ADDOPTS")}
    env["ESAMP_REQUIRE"] = "scratch"
    env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "ESAMP_REQUIRE=scratch: the scratch thing is missing: pip install scratch" in out
    assert "passed" not in out, out
