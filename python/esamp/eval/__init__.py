"""esamp.eval: does ESamp explore, and what does it cost?  Diversity / quality frontiers and pass@k.

    esamp eval diversity --prompts FILE.jsonl [-n 16] [--beta 0.1,0.25,0.5] [--baselines vanilla,min_p]
    esamp eval passk --tasks FILE.jsonl [-n 16]

Modules: diversity (runs and metrics), frontier (margins of ESamp points over the baselines' PPL-Vendi curves,
tables, plots), passk (unbiased pass@k and task checkers), exempt (special-token exemption, evaluation only),
cli (the command line).  Shipped data: data/prompts.jsonl (creative writing and open-ended questions written for
this project) and data/tasks.jsonl (short arithmetic, facts and constrained word tasks with checkers).
"""
from .passk import pass_at_k, pass_at_k_curve  # noqa: F401

__all__ = ["pass_at_k", "pass_at_k_curve"]
