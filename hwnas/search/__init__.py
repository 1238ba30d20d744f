"""Searchers under a latency budget, evaluators and Pareto tools."""
