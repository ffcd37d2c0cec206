"""Packaging: the build information recorded beside _C.so, the import-time torch check (a clear ImportError
naming the torch the build needs, not an undefined-symbol traceback), and where the library is found."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import esamp
from esamp import ops


def test_build_info_matches_the_running_torch():
    info = ops.build_info()
    assert info["torch_version"] == torch.__version__
    assert int(info["torch_cxx11_abi"]) == int(torch._C._GLIBCXX_USE_CXX11_ABI)
    assert info["torch_cuda"] == (torch.version.cuda or "")
    assert (info["cuda_kernels"] == "ON") == ops.has_cuda_kernels("reweight")
    assert os.path.exists(info["library"]) and ops.torch_mismatch(info) is None


@pytest.mark.parametrize("change,expect", [
    ({"torch_version": "2.13.0+cpu"}, "torch 2.13.0+cpu was used to build it"),
    ({"torch_cxx11_abi": 0}, "C++11 ABI 0 at build time, 1 now"),
    ({"cuda_kernels": "ON", "torch_cuda": "12.8"}, "CUDA kernels built for CUDA 12.8"),
])
def test_torch_mismatch_names_what_differs(change, expect):
    info = dict(ops.build_info(), **change)
    why = ops.torch_mismatch(info, version="2.14.1+cu130", cxx11_abi=True, cuda="13.0")
    assert why is not None and expect in why, why


def test_torch_mismatch_accepts_what_works():
    info = {"torch_version": "2.14.1+cu130", "torch_cxx11_abi": 1, "torch_cuda": "13.0", "cuda_kernels": "OFF"}
    assert ops.torch_mismatch(info, version="2.14.1+cu130", cxx11_abi=True, cuda="13.0") is None
    # The local tag is CUDA's; a CPU-kernel-only build does not depend on torch's CUDA.
    assert ops.torch_mismatch(info, version="2.14.1+cpu", cxx11_abi=True, cuda=None) is None
    with_cuda = dict(info, cuda_kernels="ON")
    assert ops.torch_mismatch(with_cuda, version="2.14.1+cu130", cxx11_abi=True, cuda="13.2") is None
    assert "none (CPU-only build)" in ops.torch_mismatch(with_cuda, version="2.14.1", cxx11_abi=True, cuda=None)


def _copy_package(dst, build_info_change):
    """A copy of the installed (or working-tree) package with its real _C.so and an edited _build_info.json."""
    src = os.path.dirname(esamp.__file__)
    pkg = dst / "esamp"
    shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("__pycache__", "_C.so", "_build_info.json"))
    lib = ops.build_info()["library"]
    shutil.copy(os.path.realpath(lib), pkg / "_C.so")
    info = {k: v for k, v in ops.build_info().items() if k != "library"}
    info.update(build_info_change)
    (pkg / "_build_info.json").write_text(json.dumps(info))
    return pkg


def _import_in_subprocess(path, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "ESAMP_SKIP_TORCH_CHECK"}
    env["PYTHONPATH"] = str(path)
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], cwd=str(path), env=env, capture_output=True, text=True,
                       timeout=300)
    # The probe must have imported the copy under `path`, not the package under test (see _IMPORT_PROBE).
    assert f"imported {os.path.realpath(path / 'esamp')}" in r.stdout, r.stdout + r.stderr[-2000:]
    return r


# An editable install (pip install -e .) puts scikit-build-core's redirecting finder first on sys.meta_path: it
# maps `esamp` to the source tree whatever PYTHONPATH says.  The probe removes that finder, so the copy on
# PYTHONPATH is what gets imported, and reports which package it imported before loading the library.
_IMPORT_PROBE = """
import importlib.util, os, sys
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildRedirectingFinder"]
spec = importlib.util.find_spec("esamp")
print("imported", os.path.realpath(os.path.dirname(spec.origin)), flush=True)
import esamp
print("loaded", esamp.ops.build_info()["library"])
"""


def test_import_with_another_torch_raises_a_clear_import_error(tmp_path):
    _copy_package(tmp_path, {"torch_version": "2.9.0+cu126"})
    r = _import_in_subprocess(tmp_path)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: esamp: the compiled extension"), r.stderr
    assert "torch 2.9.0+cu126 was used to build it" in last and "pip install torch==2.9.0" in last
    assert "pip install --no-build-isolation --no-deps --force-reinstall ." in last
    # The same copy with the true build information loads (the copy itself is sound).
    _copy_package(tmp_path / "ok", {})
    ok = _import_in_subprocess(tmp_path / "ok")
    assert ok.returncode == 0 and "loaded" in ok.stdout, ok.stderr
    # ESAMP_SKIP_TORCH_CHECK=1 skips the check (this library does load with this torch).
    forced = _import_in_subprocess(tmp_path, {"ESAMP_SKIP_TORCH_CHECK": "1"})
    assert forced.returncode == 0, forced.stderr


def test_missing_library_raises_an_import_error_with_the_install_command(tmp_path):
    pkg = _copy_package(tmp_path, {})
    os.remove(pkg / "_C.so")
    r = _import_in_subprocess(tmp_path)
    assert r.returncode != 0
    assert "ImportError: esamp: compiled library _C.so not found" in r.stderr
    assert "pip install --no-build-isolation ." in r.stderr


def test_link_dists_hard_links_a_distribution_and_what_it_requires(tmp_path):
    """tools/link_dists.py (CI's wheel check gets the project venv's torch into its fresh venv this way): every
    file of the named distribution and of its requirements (pytest -> pluggy, iniconfig, ...) appears under the
    destination as a hard link of the installed file, and the linked package imports from there alone."""
    import importlib.metadata as md
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dest = tmp_path / "site"
    dest.mkdir()
    # an older pluggy already in DEST (as a fresh venv holds its own setuptools): removed first, not overlaid
    (dest / "pluggy").mkdir()
    (dest / "pluggy" / "_stale.py").write_text("")
    info = dest / "pluggy-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pluggy\nVersion: 0.0.1\n")
    (info / "RECORD").write_text("pluggy/_stale.py,,\npluggy-0.0.1.dist-info/METADATA,,\npluggy-0.0.1.dist-info/RECORD,,\n")
    out = subprocess.run([sys.executable, os.path.join(root, "tools", "link_dists.py"), str(dest), "pytest"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "removed from DEST first: pluggy==0.0.1" in out.stdout, out.stdout
    assert not info.exists() and not (dest / "pluggy" / "_stale.py").exists()
    assert [p.name for p in dest.glob("pluggy-*.dist-info")] == [f"pluggy-{md.version('pluggy')}.dist-info"]
    for name in ("pytest", "pluggy", "iniconfig"):
        assert f"{md.distribution(name).metadata['Name']}=={md.version(name)}" in out.stdout, out.stdout
    src = md.distribution("pluggy").locate_file("pluggy/__init__.py")
    dst = dest / "pluggy" / "__init__.py"
    if os.stat(src).st_dev == os.stat(dest).st_dev:
        assert os.stat(src).st_ino == os.stat(dst).st_ino  # a link, not a copy
    assert list(dest.glob("pluggy-*.dist-info/METADATA"))
    probe = subprocess.run([sys.executable, "-S", "-c",
                            "import sys; sys.path.insert(0, sys.argv[1]); import pluggy, importlib.metadata as m; "
                            "print(pluggy.__file__); print(m.version('pluggy'))", str(dest)],
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines()[0].startswith(str(dest)), probe.stdout
    assert probe.stdout.splitlines()[1] == md.version("pluggy")


def test_link_dists_names_a_missing_distribution(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "tools", "link_dists.py"), str(tmp_path),
                          "no-such-distribution-esamp"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "'no-such-distribution-esamp' is required but not installed" in out.stderr
