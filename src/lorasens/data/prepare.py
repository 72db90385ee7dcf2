"""The one way from a run's data settings (`cfg.data`) to what the model sees: the split's examples loaded, the
prompt template applied (`--prompt_template`: the same prompts for training, validation loss, analysis and
evaluation) and, with a tokenizer, the features (target-only loss) at `--max_length`.

Used by `lorasens train` (train, validation and the analysis split), `analyze` (the analysis split), `eval` (the
evaluation split) and `validate` (the trainings' train split, the held-out test split).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorasens.data.features import FeatureStats, build_features
from lorasens.data.registry import Example, load_examples, training_splits
from lorasens.data.templates import apply_prompt_template

TRAINING_SPLITS = ("train", "validation", "analysis")


def templated(data: Any, examples: list[Example]) -> list[Example]:
    return apply_prompt_template(examples, data.prompt_template, data.dataset)


def examples(data: Any, split: str, seed: int, limit: int | None = None) -> list[Example]:
    """The examples of one split of the dataset's files (a seeded `limit`-subset, file order), template applied."""
    return templated(data, load_examples(data.dataset, split, data.data_dir, seed, limit, options=data))


def training_examples(data: Any, seed: int, splits: tuple[str, ...] = TRAINING_SPLITS) -> dict[str, list[Example]]:
    """A training run's splits, template applied: train and the analysis split (carved out of the train file,
    disjoint by prompt; `registry.training_splits`) and validation (`--eval_samples` of the validation file)."""
    chosen: dict[str, list[Example]] = {}
    if "train" in splits or "analysis" in splits:
        chosen["train"], chosen["analysis"] = training_splits(data.dataset, data.data_dir, seed, data.train_samples,
                                                              data.analysis_samples, options=data)
    if "validation" in splits:
        chosen["validation"] = load_examples(data.dataset, "validation", data.data_dir, seed, data.eval_samples,
                                             options=data)
    return {split: templated(data, chosen[split]) for split in splits}


@dataclass
class Prepared:
    examples: dict[str, list[Example]]
    features: dict[str, list[dict]] = field(default_factory=dict)
    stats: dict[str, FeatureStats] = field(default_factory=dict)


def prepare(data: Any, tokenizer, seed: int, splits: tuple[str, ...] = TRAINING_SPLITS) -> Prepared:
    """Examples, template and features of a training run's `splits` (features built in the order given)."""
    prepared = Prepared(training_examples(data, seed, splits))
    for split in splits:
        prepared.features[split], prepared.stats[split] = build_features(prepared.examples[split], tokenizer,
                                                                         data.max_length, split)
    return prepared
