"""Paired analysis of two methods of an `esamp eval passk --suite` run that share their random numbers.

Sample j of problem i uses the same Philox noise under every method, so a vanilla sample and the ESamp sample of
the same (i, j) are identical until the first token where ESamp's mixing changed the arg max; after it they are
two different continuations of one prefix.  This prints, over all pairs:
  - how often the samples are identical, and where (character offset) they first differ;
  - the 2x2 table of (baseline correct?, other correct?) -- does ESamp's change break correct samples more often
    than it repairs wrong ones?
  - per problem: correct counts of both methods;
  - per method, the samples that hit the token budget, and how many of those are in a loop (a runaway loop:
    the loop rate alone also counts repetitions the task asks for, e.g. a docstring copied with its examples).

  PYTHONPATH=python python bench/esamp_pairs.py OUT_DIR "vanilla T=1 min_p=0.1" "esamp b=0.25 lr=0.0004 wu=30 min_p=0.1"
  [--split SPLIT]   (only the problems of SPLIT, e.g. 0-19, read as `esamp eval passk --split` reads it)
"""
import glob
import json
import os
import statistics
import sys


def load(out_dir, method):
    safe = "".join(ch if ch.isalnum() or ch in "=.-" else "_" for ch in method)
    recs = {}
    for f in glob.glob(os.path.join(out_dir, "runs", f"{safe}_s*_*.json")):
        r = json.load(open(f))
        if r["method"] != method:
            continue
        n = len(r["texts"][0]) if r["texts"] else 0
        for i, (pid, texts, ok) in enumerate(zip(r["problems"], r["texts"], r["correct"])):
            trunc = r["truncated"][i] if "truncated" in r else [False] * n
            loop = r["loop"][i] if "loop" in r else [False] * n
            recs[(r["seed"], pid)] = (texts, ok, trunc, loop)
    return recs


def first_diff(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv=None):
    argv = list(argv or sys.argv[1:])
    split = None
    if "--split" in argv:
        i = argv.index("--split")
        split, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    out_dir, base, other = argv[:3]
    A, B = load(out_dir, base), load(out_dir, other)
    keys = sorted(set(A) & set(B))
    if split is not None:
        from esamp.eval.suites import parse_split

        keep = set(parse_split(split, {}, 1 << 30))
        keys = [k for k in keys if int(str(k[1]).rsplit("/", 1)[-1]) in keep]
    if not keys:
        raise SystemExit("no common (seed, problem) records")
    same, offs = 0, []
    table = {(x, y): 0 for x in (True, False) for y in (True, False)}
    per = []
    for k in keys:
        (ta, oa, *_), (tb, ob, *_) = A[k], B[k]
        for sa, sb, ca, cb in zip(ta, tb, oa, ob):
            d = first_diff(sa, sb)
            if d is None:
                same += 1
            else:
                offs.append(d)
            table[(bool(ca), bool(cb))] += 1
        per.append((k[1], sum(oa), sum(ob)))
    n = sum(table.values())
    print(f"{len(keys)} problems, {n} sample pairs: identical {same} ({same / n:.1%}); first difference at character "
          f"offset median {statistics.median(offs) if offs else 'n/a'} "
          f"(quartiles {statistics.quantiles(offs, n=4) if len(offs) > 3 else 'n/a'})")
    print(f"baseline correct -> other correct {table[(True, True)]}, -> wrong {table[(True, False)]}; "
          f"baseline wrong -> other correct {table[(False, True)]}, -> wrong {table[(False, False)]}")
    print("per problem (baseline / other correct of n):", " ".join(f"{p.split('/')[-1]}:{a}/{b}" for p, a, b in per))
    for name, R in ((base, A), (other, B)):
        tr = [(t, lp) for k in keys for t, lp in zip(R[k][2], R[k][3]) if t]
        print(f"{name}: {len(tr)} of {n} samples hit the token budget, {sum(bool(lp) for _, lp in tr)} of them in a loop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
