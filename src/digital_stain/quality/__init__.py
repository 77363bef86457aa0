"""Scoring: metrics, NIQE, evaluation, synthetic pairs with a known answer."""
