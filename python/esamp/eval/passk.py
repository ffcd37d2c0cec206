"""pass@k on tasks with a checker: the unbiased estimator of Chen et al. (2021), vanilla vs ESamp.

A task file is JSON lines, one task per line::

    {"id": "add-15-27", "prompt": "What is 15 + 27?", "check": {"type": "number", "answer": 42}}

Checkers (``check.type``):

- ``number``: the first number in the completion that is not one of the numbers of the prompt must equal
  ``answer`` (so "15 + 27 = 42" passes and "15 + 27 = 32" fails; restating the operands is neither).
- ``exact``: the completion, stripped, lower-cased and without trailing punctuation, equals ``answer`` (or one of a
  list of answers).
- ``regex``: ``re.search(pattern, completion)`` matches (``flags``: "i" for case-insensitive, the default).
- ``python``: a Python expression over ``text`` (the completion), ``words`` (its lower-cased words, punctuation
  stripped), ``first_line`` and ``re``, evaluated without builtins except len/any/all/set/sum/min/max.  Task
  files are code: only run task files you trust.

pass@k for one task with n samples of which c pass: 1 - C(n - c, k) / C(n, k), computed as the product
1 - prod_{i = n - c + 1}^{n} (1 - k / i) (exact in real arithmetic, no large binomials).  The mean over tasks is
reported for every k = 1..n.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = ["pass_at_k", "pass_at_k_curve", "make_checker", "load_tasks", "score_samples", "run_passk",
           "render_passk_markdown", "write_passk_plot", "BUILTIN_TASKS", "NUMBER_RE"]

BUILTIN_TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tasks.jsonl")
NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")
_WORD_RE = re.compile(r"[a-z']+")
_SAFE_BUILTINS = {"len": len, "any": any, "all": all, "set": set, "sum": sum, "min": min, "max": max,
                  "sorted": sorted, "str": str, "int": int}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    for name, v in (("n", n), ("c", c), ("k", k)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c: expected 0 <= c <= n = {n}, got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k: expected 1 <= k <= n = {n}, got {k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_curve(n: int, c: int) -> List[float]:
    """[pass@1, ..., pass@n] for one task."""
    return [pass_at_k(n, c, k) for k in range(1, n + 1)]


def _numbers(text: str) -> List[float]:
    return [float(m.group(0)) for m in NUMBER_RE.finditer(text.replace(",", ""))]


def _norm(text: str) -> str:
    return text.strip().lower().rstrip(".!?;:").strip().strip("\"'").strip()


def make_checker(check: Dict[str, Any], prompt: str = "") -> Callable[[str], bool]:
    """A predicate completion -> bool for one task's ``check`` object (see the module docstring)."""
    if not isinstance(check, dict) or "type" not in check:
        raise ValueError(f"check: expected an object with a 'type' field, got {check!r}")
    kind = check["type"]
    if kind == "number":
        if "answer" not in check or not isinstance(check["answer"], (int, float)):
            raise ValueError(f"check.answer: expected a number for type 'number', got {check.get('answer')!r}")
        answer = float(check["answer"])
        given = set(_numbers(prompt))

        def number(text: str) -> bool:
            rest = [v for v in _numbers(text) if v not in given]
            return bool(rest) and abs(rest[0] - answer) <= 1e-9 * max(1.0, abs(answer))
        return number
    if kind == "exact":
        answers = check.get("answer")
        answers = [answers] if isinstance(answers, str) else answers
        if not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"check.answer: expected a string or a list of strings for type 'exact', got "
                             f"{check.get('answer')!r}")
        want = {_norm(a) for a in answers}
        return lambda text: _norm(text) in want
    if kind == "regex":
        pattern = check.get("pattern")
        if not isinstance(pattern, str):
            raise ValueError(f"check.pattern: expected a string for type 'regex', got {pattern!r}")
        flags = re.IGNORECASE if "i" in check.get("flags", "i") else 0
        rx = re.compile(pattern, flags)
        return lambda text: rx.search(text) is not None
    if kind == "python":
        expr = check.get("predicate")
        if not isinstance(expr, str):
            raise ValueError(f"check.predicate: expected a Python expression string, got {expr!r}")
        code = compile(expr, "<check.predicate>", "eval")

        def python(text: str) -> bool:
            env = {"text": text, "words": _WORD_RE.findall(text.lower()), "re": re,
                   "first_line": text.strip().split("\n")[0] if text.strip() else ""}
            return bool(eval(code, {"__builtins__": _SAFE_BUILTINS}, env))  # noqa: S307 -- trusted task files
        return python
    raise ValueError(f"check.type: expected one of 'number', 'exact', 'regex', 'python', got {kind!r}")


def load_tasks(path: str = BUILTIN_TASKS) -> List[Dict[str, Any]]:
    """Tasks of a JSON-lines file: dicts with id, prompt, check and a compiled ``checker``."""
    tasks = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                t = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(t.get("prompt"), str) or not t["prompt"].strip():
                raise ValueError(f"{path}:{lineno}: expected a non-empty 'prompt' string")
            t.setdefault("id", f"task{lineno}")
            try:
                t["checker"] = make_checker(t.get("check"), t["prompt"])
            except ValueError as e:
                raise ValueError(f"{path}:{lineno} ({t['id']}): {e}") from e
            tasks.append(t)
    if not tasks:
        raise ValueError(f"{path}: no tasks")
    return tasks


def score_samples(tasks: Sequence[Dict[str, Any]], texts: Sequence[Sequence[str]]) -> Dict[str, Any]:
    """Per-task correct counts and the mean pass@k curve over tasks for one method's samples."""
    if len(tasks) != len(texts):
        raise ValueError(f"texts: expected one group per task ({len(tasks)}), got {len(texts)}")
    per_task, curves = [], []
    n = len(texts[0])
    for t, group in zip(tasks, texts):
        if len(group) != n:
            raise ValueError(f"texts: expected {n} samples for every task, got {len(group)} for {t['id']}")
        ok = [bool(t["checker"](s)) for s in group]
        c = sum(ok)
        curve = pass_at_k_curve(n, c)
        curves.append(curve)
        per_task.append({"id": t["id"], "correct": c, "n": n, "pass_at_1": curve[0], "pass_at_n": curve[-1]})
    mean = [sum(cv[k] for cv in curves) / len(curves) for k in range(n)]
    return {"per_task": per_task, "pass_at_k": mean, "solved_tasks": sum(1 for p in per_task if p["correct"] > 0)}



def run_passk(model, tokenizer, tasks: Sequence[Dict[str, Any]], methods, *, n: int = 16, max_new_tokens: int = 48,
              seeds: Sequence[int] = (0,), chat: bool = True, progress: bool = True) -> Dict[str, Any]:
    """Sample n completions per task for every method (esamp.eval.diversity.Method) and seed; pass@k for
    k = 1..n, averaged over tasks, then over seeds."""
    from .diversity import run_method

    prompts = [t["prompt"] for t in tasks]
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    jobs = [(m, s) for s in seeds for m in methods]
    bar = tqdm(total=len(jobs), desc="pass@k runs", unit="run", disable=not progress) if tqdm else None
    res: Dict[str, Any] = {"settings": {"tasks": [t["id"] for t in tasks], "n": n, "max_new_tokens": max_new_tokens,
                                        "seeds": list(seeds), "chat": chat},
                           "methods": [m.to_dict() for m in methods], "runs": {m.name: {} for m in methods}}
    try:
        for m, seed in jobs:
            out = run_method(model, tokenizer, prompts, m, n=n, max_new_tokens=max_new_tokens, seed=seed, chat=chat,
                             progress=progress)
            sc = score_samples(tasks, out.texts)
            sc["mean_tokens"] = out.stats["mean_length"]
            sc["texts"] = out.texts
            if "trainer" in out.stats:
                sc["rows_trained"] = out.stats["trainer"]["rows_trained"]
                if sc["rows_trained"] == 0:
                    raise RuntimeError(f"{m.name} seed {seed}: the distiller trained zero rows (failed run)")
            res["runs"][m.name][str(seed)] = sc
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{m.name[:28]} s{seed}: pass@1 {sc['pass_at_k'][0]:.3f}")
    finally:
        if bar is not None:
            bar.close()
    for m in methods:
        curves = [r["pass_at_k"] for r in res["runs"][m.name].values()]
        res["runs"][m.name]["mean"] = {
            "pass_at_k": [sum(c[k] for c in curves) / len(curves) for k in range(n)],
            "solved_tasks": sum(r["solved_tasks"] for s, r in res["runs"][m.name].items() if s != "mean")
            / len(curves),
            "mean_tokens": sum(r["mean_tokens"] for s, r in res["runs"][m.name].items() if s != "mean")
            / len(curves)}
    return res


def render_passk_markdown(res: Dict[str, Any], ks: Optional[Sequence[int]] = None) -> str:
    """A markdown table of pass@k (mean over tasks and seeds) at a few k, plus tasks solved and length."""
    n = res["settings"]["n"]
    ks = [k for k in (ks or (1, 2, 4, 8, 16, 32, 64)) if k <= n]
    if n not in ks:
        ks.append(n)
    st = res["settings"]
    lines = [f"{len(st['tasks'])} tasks x n = {n} samples, {st['max_new_tokens']} new tokens, seeds "
             f"{', '.join(str(s) for s in st['seeds'])}; pass@k = unbiased estimator, mean over tasks and seeds.", "",
             "| method | " + " | ".join(f"pass@{k}" for k in ks) + " | tasks solved (any sample) | tokens |",
             "|---|" + "---|" * (len(ks) + 2)]
    for m in res["methods"]:
        r = res["runs"][m["name"]]["mean"]
        lines.append(f"| {m['name']} | " + " | ".join(f"{r['pass_at_k'][k - 1]:.3f}" for k in ks)
                     + f" | {r['solved_tasks']:.1f} / {len(st['tasks'])} | {r['mean_tokens']:.1f} |")
    return "\n".join(lines) + "\n"


def write_passk_plot(res: Dict[str, Any], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    n = res["settings"]["n"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in res["methods"]:
        ax.plot(range(1, n + 1), res["runs"][m["name"]]["mean"]["pass_at_k"], marker="o", ms=3, label=m["name"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (mean over tasks)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
