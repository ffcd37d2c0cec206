"""Paired analysis of two methods of an `esamp eval passk --suite` run that share their random numbers.

Sample j of problem i uses the same Philox noise under every method, so a vanilla sample and the ESamp sample of
the same (i, j) are identical until the first token where ESamp's mixing changed the arg max; after it they are
two different continuations of one prefix.  This prints, over all pairs:
  - how often the samples are identical, and where (character offset) they first differ;
  - the 2x2 table of (baseline correct?, other correct?) -- does ESamp's change break correct samples more often
    than it repairs wrong ones?
  - per problem: correct counts of both methods.

  PYTHONPATH=python python bench/esamp_pairs.py OUT_DIR "vanilla T=1 min_p=0.1" "esamp b=0.25 lr=0.0004 wu=30 min_p=0.1"
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
        for pid, texts, ok in zip(r["problems"], r["texts"], r["correct"]):
            recs[(r["seed"], pid)] = (texts, ok)
    return recs


def first_diff(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv=None):
    argv = argv or sys.argv[1:]
    out_dir, base, other = argv[:3]
    A, B = load(out_dir, base), load(out_dir, other)
    keys = sorted(set(A) & set(B))
    if not keys:
        raise SystemExit("no common (seed, problem) records")
    same, offs = 0, []
    table = {(x, y): 0 for x in (True, False) for y in (True, False)}
    per = []
    for k in keys:
        (ta, oa), (tb, ob) = A[k], B[k]
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
