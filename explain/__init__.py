"""SFAM explanations of matches (and baselines)."""
