"""Benchmark suites for `esamp eval passk --suite ...`: prompts in each suite's own format, and graders.

- ``gsm8k``: the 100 original GSM8K test problems (esamp.eval.assets).  Prompt (one chat user turn):
  the suite's own instruction (``eng/instruction.toml``: "Solve the following math problem step by step. Put your
  final numeric answer ... in \\boxed{}") followed by the question.  Graded numerically: the content of the LAST
  ``\\boxed{...}`` (balanced braces; LaTeX units, ``$``, ``%`` and thousands separators removed), else the last
  number of the completion, must equal the reference (the number after ``####``) to 1e-6 relative.
- ``humaneval``: the 164 HumanEval problems.  Prompt: the instruction-model format of EvalPlus -- a user turn
  asking for a self-contained script for the function in a markdown code block, and the assistant turn opened with
  "Below is a Python script with a self-contained function that solves the problem and passes corresponding
  tests:" followed by a python code fence.  Generation stops at the closing fence.  Graded by running the program
  (the completion's code, preceded by the problem's imports if the completion defines the entry point, else the
  problem's prompt followed by the completion) with the problem's tests and ``check(entry_point)`` in a sandboxed
  child process (esamp.eval.sandbox: own process, no network, rlimits, timeout) -- never in this process.

``split`` selects problems: for gsm8k "dev" = files 0000-0049, "heldout" = 0050-0099 (run once, at the end, with
settings chosen on dev), "all", or a range "a-b" / a comma list of file numbers; for humaneval "all" (= dev) or a
range of problem indices.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import assets

__all__ = ["Suite", "SUITES", "get_suite", "parse_split", "gsm8k_extract", "gsm8k_correct",
           "humaneval_program", "humaneval_extract_code", "math_correct"]


@dataclass
class Suite:
    """A list of problems with prompts (token ids or chat strings) and a batch grader."""

    name: str
    problems: List[Dict[str, Any]]
    prompts: List[Any]                       # per problem: a str (chat-formatted by generate) or token ids
    grade: Callable[[List[Dict[str, Any]], List[List[str]]], List[List[bool]]]
    stop: Sequence[str] = ()                 # stop strings (generation of a row ends when its text holds one)
    max_new_tokens: int = 512
    chat: bool = True
    description: str = ""

    @property
    def ids(self) -> List[str]:
        return [p["id"] for p in self.problems]


# --------------------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------------------
def parse_split(split: str, named: Dict[str, Sequence[int]], total: int) -> List[int]:
    """'dev' / 'heldout' / 'all' (keys of `named`), 'a-b' (inclusive) or 'a,b,c' -> sorted problem indices."""
    if not isinstance(split, str) or not split.strip():
        raise ValueError(f"split: expected a name ({', '.join(named)}), a range a-b or a list a,b,c; got {split!r}")
    s = split.strip()
    if s in named:
        return list(named[s])
    out = set()
    for part in s.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        try:
            if m:
                a, b = int(m.group(1)), int(m.group(2))
                if a > b:
                    raise ValueError
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"split: cannot read {part!r} in {split!r} (expected a name among "
                             f"{', '.join(named)}, a range a-b or numbers)") from None
    bad = [i for i in out if not 0 <= i < total]
    if bad:
        raise ValueError(f"split: problem numbers must lie in 0..{total - 1}, got {sorted(bad)[:5]}")
    return sorted(out)


# --------------------------------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------------------------------
_NUM = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}) with balanced braces, or None."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
            i += 1
        if depth == 0:
            best = text[m.end():i - 1]
    return best


def _clean_number_text(s: str) -> str:
    s = re.sub(r"\\text\s*\{[^{}]*\}", " ", s)
    s = re.sub(r"\\(?:mathrm|textbf|mathbf)\s*\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\$", " ").replace("$", " ").replace("\\%", " ").replace("%", " ").replace("\\!", "")
    s = s.replace("\\,", "").replace("{,}", "")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)            # thousands separators
    return s


def _frac(s: str) -> Optional[float]:
    m = re.search(r"(-?)\\d?frac\s*\{\s*(-?\d+(?:\.\d+)?)\s*\}\s*\{\s*(-?\d+(?:\.\d+)?)\s*\}", s)
    if m and float(m.group(3)) != 0:
        v = float(m.group(2)) / float(m.group(3))
        return -v if m.group(1) else v
    return None


def gsm8k_extract(text: str) -> Optional[float]:
    """The numeric answer of a completion: the last \\boxed{} (its first number, or a \\frac), else the last
    number in the text; None if there is none."""
    box = _last_boxed(text)
    if box is not None:
        b = _clean_number_text(box)
        f = _frac(b)
        if f is not None:
            return f
        nums = _NUM.findall(b)
        if nums:
            return float(nums[0])
    nums = _NUM.findall(_clean_number_text(text))
    return float(nums[-1]) if nums else None


def gsm8k_correct(text: str, target: str) -> bool:
    v = gsm8k_extract(text)
    if v is None:
        return False
    t = float(target)
    return abs(v - t) <= 1e-6 * max(1.0, abs(t))


def _gsm8k(split: str) -> Suite:
    idx = parse_split(split, {"dev": assets.GSM8K_DEV, "heldout": assets.GSM8K_HELDOUT, "all": range(100)}, 100)
    probs = assets.gsm8k_problems(idx)
    prompts = [f"{p['instruction']}\n\n{p['question']}" for p in probs]

    def grade(problems, texts):
        return [[gsm8k_correct(s, p["target"]) for s in group] for p, group in zip(problems, texts)]

    return Suite("gsm8k", probs, prompts, grade, stop=(), max_new_tokens=512, chat=True,
                 description=f"GSM8K test problems {split} ({len(probs)}), graded numerically")


# --------------------------------------------------------------------------------------------------------------
# HumanEval
# --------------------------------------------------------------------------------------------------------------
HUMANEVAL_INSTRUCTION = ("Please provide a self-contained Python script that solves the following problem in a "
                         "markdown code block:\n```\n{prompt}\n```")
HUMANEVAL_RESPONSE = ("Below is a Python script with a self-contained function that solves the problem and passes "
                      "corresponding tests:\n```python\n")


def humaneval_extract_code(completion: str) -> str:
    """The code of a completion that starts inside a python fence: everything before the closing fence."""
    end = completion.find("```")
    return completion if end < 0 else completion[:end]


def _imports(prompt: str) -> str:
    return "\n".join(line for line in prompt.splitlines()
                     if line.startswith("import ") or line.startswith("from "))


def humaneval_program(problem: Dict[str, Any], completion: str) -> str:
    """The program run for one sample: solution + the problem's tests + check(entry_point)."""
    code = humaneval_extract_code(completion)
    ep = problem["entry_point"]
    if re.search(rf"^\s*def\s+{re.escape(ep)}\s*\(", code, re.M):
        solution = _imports(problem["prompt"]) + "\n" + code
    else:
        solution = problem["prompt"] + code
    return f"{solution}\n\n{problem['test']}\n\ncheck({ep})\n"


def _humaneval(split: str, tokenizer, workers: int = 2, timeout_s: float = 10.0) -> Suite:
    from . import sandbox

    all_probs = assets.humaneval_problems()
    idx = parse_split(split, {"all": range(len(all_probs)), "dev": range(len(all_probs))}, len(all_probs))
    probs = [dict(all_probs[i], id=all_probs[i]["task_id"], index=i) for i in idx]
    prompts: List[Any] = []
    for p in probs:
        msg = HUMANEVAL_INSTRUCTION.format(prompt=p["prompt"].strip())
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True,
                                                 tokenize=False) + HUMANEVAL_RESPONSE
            prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            prompts.append(msg + "\n" + HUMANEVAL_RESPONSE)

    def grade(problems, texts):
        jobs, memo = [], {}
        for pi, (p, group) in enumerate(zip(problems, texts)):
            for s in group:
                prog = humaneval_program(p, s)
                if prog not in memo:
                    memo[prog] = None
                    jobs.append(prog)
                # identical programs (common at low temperature) run once
        with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
            for prog, res in zip(jobs, ex.map(lambda c: sandbox.run_program(c, timeout_s=timeout_s), jobs)):
                memo[prog] = res.passed
        return [[memo[humaneval_program(p, s)] for s in group] for p, group in zip(problems, texts)]

    return Suite("humaneval", probs, prompts, grade, stop=("```",), max_new_tokens=512, chat=False,
                 description=f"HumanEval problems {split} ({len(probs)}), graded by running the tests in a sandbox")


# --------------------------------------------------------------------------------------------------------------
# MATH-500 / AIME (GPU sessions: long answers)
# --------------------------------------------------------------------------------------------------------------
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def math_correct(text: str, answer: str) -> bool:
    """math-verify's equivalence of the completion's final answer with the reference (LaTeX-aware)."""
    try:
        from math_verify import parse, verify
    except ImportError as e:  # pragma: no cover - checked by get_suite
        raise ImportError("the math500/aime suites grade with math-verify: bash tools/install_eval_assets.sh --gpu") from e
    gold = parse("$" + answer + "$")
    pred = parse(text)
    return bool(pred) and bool(verify(gold, pred))


def _mmath(name: str, split: str) -> Suite:
    import importlib.util

    if importlib.util.find_spec("math_verify") is None:
        raise ValueError(f"suite: {name!r} grades with math-verify, which is not installed "
                         "(GPU sessions: bash tools/install_eval_assets.sh --gpu)")
    sources = ("MATH500",) if name == "math500" else ("AIME2024", "AIME2025")
    probs = assets.mmath_problems(sources)
    idx = parse_split(split, {"all": range(len(probs)), "dev": range(len(probs))}, len(probs))
    probs = [probs[i] for i in idx]
    prompts = [f"{p['question']}\n\n{MATH_INSTRUCTION}" for p in probs]

    def grade(problems, texts):
        return [[math_correct(s, p["answer"]) for s in group] for p, group in zip(problems, texts)]

    return Suite(name, probs, prompts, grade, stop=(), max_new_tokens=2048, chat=True,
                 description=f"{'MATH-500 (MMATH subset)' if name == 'math500' else 'AIME 2024+2025'} {split} "
                             f"({len(probs)}), graded with math-verify")


SUITES = ("gsm8k", "humaneval", "math500", "aime")


def get_suite(name: str, split: str = "dev", tokenizer=None, **kw) -> Suite:
    """The suite `name` ('gsm8k' | 'humaneval') restricted to `split`."""
    if name == "gsm8k":
        return _gsm8k(split)
    if name == "humaneval":
        return _humaneval("all" if split == "dev" else split, tokenizer, **kw)
    if name in ("math500", "aime"):
        return _mmath(name, "all" if split == "dev" else split)
    raise ValueError(f"suite: expected one of {', '.join(SUITES)}, got {name!r}")
