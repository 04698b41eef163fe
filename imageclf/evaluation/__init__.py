"""Evaluation: metrics on a test split, and the error analysis a person looks at."""
