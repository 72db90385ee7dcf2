"""Evaluation: batched generation, per-dataset metrics, predictions files, and the Python API.

Importing this package is light; torch, transformers and the scorers load when a function needs them.
"""

from lorasens.evaluation.api import evaluate_dataset, evaluate_e2e, evaluate_mnli, evaluate_samsum, evaluate_wikisql

__all__ = ["evaluate_dataset", "evaluate_e2e", "evaluate_mnli", "evaluate_samsum", "evaluate_wikisql"]
