"""Empirical privacy audit: a lower bound on epsilon from canaries in one training run."""
