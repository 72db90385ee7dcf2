"""Datasets: one module each, registered by name in `registry`; `tokenize` turns examples into training features."""

from lorasens.data.registry import DATASETS, DatasetSpec, Example, get_dataset_spec, load_examples

__all__ = ["DATASETS", "DatasetSpec", "Example", "get_dataset_spec", "load_examples"]
