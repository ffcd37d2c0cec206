"""Degeneration metrics (esamp.metrics): loop detection, tail-token rate, within-sample distinct-n."""
import math
import random

import pytest

from esamp import metrics


def brute_loop(ids, max_ngram=6, min_repeats=4, ignore=()):
    """Reference: any start i and n-gram length n with min_repeats consecutive copies (not all ignored)."""
    for i in range(len(ids)):
        for n in range(1, max_ngram + 1):
            gram = ids[i:i + n]
            if len(gram) < n or all(t in ignore for t in gram):
                continue
            if all(ids[i + r * n:i + (r + 1) * n] == gram for r in range(min_repeats)):
                return i
    return None


@pytest.mark.parametrize("alphabet", [2, 3, 5])
def test_find_loop_matches_brute_force(alphabet):
    rng = random.Random(alphabet)
    hits = 0
    for _ in range(400):
        L = rng.randint(0, 40)
        ids = [rng.randrange(alphabet) for _ in range(L)]
        if rng.random() < 0.3 and L > 4:       # plant a loop sometimes
            n = rng.randint(1, 3)
            at = rng.randrange(L)
            gram = [rng.randrange(alphabet) for _ in range(n)]
            ids[at:at] = gram * 4
        ignore = (0,) if rng.random() < 0.3 else ()
        got = metrics.find_loop(ids, ignore_ids=ignore)
        want = brute_loop(ids, ignore=ignore)
        assert (got is None) == (want is None), (ids, got, want)
        if got is not None:
            hits += 1
            assert got["start"] == want
            n = len(got["ngram"])
            assert ids[got["start"]:got["start"] + n * got["repeats"]] == got["ngram"] * got["repeats"]
    assert hits > 20                             # the random cases exercise both outcomes


def test_loop_examples_from_the_issue():
    # "...sparkzzzzzzzzzzzzzzzz...": a character run, whatever the tokenisation
    assert metrics.has_loop([1, 2, 3], "a spark" + "z" * 16)
    assert not metrics.has_loop([1, 2, 3], "a spark" + "z" * 7)
    # "wide wide wide wide": a 1-gram four times; three times is not a loop
    assert metrics.has_loop([5, 9, 9, 9, 9, 6])
    assert not metrics.has_loop([5, 9, 9, 9, 6])
    # a 6-gram four times is a loop, a 7-gram is not looked for
    assert metrics.has_loop(list(range(6)) * 4)
    assert not metrics.has_loop(list(range(7)) * 4)
    # indentation: whitespace runs and whitespace-only tokens are not loops
    assert not metrics.has_loop([7, 7, 7, 7], "def f():\n" + " " * 12 + "return 1", ignore_ids=[7])
    assert metrics.has_loop([7, 7, 7, 7], "x")


def test_loop_rate_and_validation():
    samples = [[1, 1, 1, 1], [1, 2, 3], [4, 5, 4, 5, 4, 5, 4, 5]]
    assert metrics.loop_rate(samples) == pytest.approx(2 / 3)
    assert metrics.loop_rate(samples, ["a", "c" * 9, "b"]) == 1.0
    assert math.isnan(metrics.loop_rate([]))
    with pytest.raises(ValueError, match="texts"):
        metrics.loop_rate(samples, ["a"])
    with pytest.raises(ValueError, match="min_repeats"):
        metrics.find_loop([1], min_repeats=1)


def test_loop_rate_ignores_whitespace_and_digit_tokens_of_a_tokenizer():
    class Tok:
        def decode(self, ids):
            return {0: "    ", 1: "x", 2: "\n", 3: "0", 4: " 3"}[ids[0]]

    assert metrics.loop_rate([[0, 0, 0, 0, 1]], tokenizer=Tok()) == 0.0
    assert metrics.loop_rate([[1, 3, 3, 3, 3, 3, 2]], tokenizer=Tok()) == 0.0        # 1000000
    assert metrics.loop_rate([[4, 4, 4, 4]], tokenizer=Tok()) == 0.0
    assert metrics.loop_rate([[1, 1, 1, 1, 0]], tokenizer=Tok()) == 1.0
    assert metrics.loop_rate([[1, 3, 1, 3, 1, 3, 1, 3]], tokenizer=Tok()) == 1.0      # "x0" four times
    # digits and whitespace runs in the text are not loops either; other characters are
    assert not metrics.has_loop([1], "42.0000000000 and 3.33333333")
    assert metrics.has_loop([1], "aaaaaaaa")


def test_tail_token_rate():
    lp = [[math.log(0.5), math.log(1e-4)], [math.log(2e-3)], []]
    assert metrics.tail_token_rate(lp) == pytest.approx(1 / 3)
    assert metrics.tail_token_rate(lp, threshold=0.01) == pytest.approx(2 / 3)
    assert math.isnan(metrics.tail_token_rate([[]]))
    with pytest.raises(ValueError, match="threshold"):
        metrics.tail_token_rate(lp, threshold=0)


def test_within_distinct_n():
    # "a b a b a b": bigrams ab, ba, ab, ba, ab -> 2 unique / 5; "x y z": 2 / 2
    assert metrics.within_distinct_n(["a b a b a b", "x y z"], 2) == pytest.approx((2 / 5 + 1) / 2)
    assert metrics.within_distinct_n(["one", "two words"], 2) == 1.0      # "one" has no bigram: left out
    assert math.isnan(metrics.within_distinct_n(["one"], 2))
