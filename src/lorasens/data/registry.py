"""The dataset registry. A dataset module registers a `DatasetSpec`; lookups of unknown names list the valid ones.

Splits are always "train", "validation" and "test". Training uses "train"; validation loss uses "validation";
final evaluation uses "test" (a dataset may fall back to "validation" when it has no test split, and says so).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorasens.data.files import read_table_records, stable_bucket
from lorasens.errors import UserError, unknown_choice

logger = logging.getLogger(__name__)

Split = str  # "train" | "validation" | "test"
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str  # model input, ending where the answer starts
    target: str  # the answer the loss is computed on (one reference)
    references: tuple[str, ...] = ()  # every reference for this prompt (evaluation)
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    # A chat example (custom data in TRL's conversational format): ({role, content}, ...) ending in the assistant
    # turn `target` holds. Rendered with the tokenizer's chat template (features.py); `prompt` is then only a
    # readable `role: content` transcript of the turns before the answer.
    messages: tuple[dict, ...] = field(default=(), compare=False, hash=False)


# Extra evaluation sets of a dataset: (split, data_dir, select) -> (named example sets, metrics of sets that are
# unavailable). `select(examples=None)` applies the run's prompt template and --eval_samples subset to `examples`
# (default: the split's own examples).
EvalSetsHook = Callable[[Split, "Path | None", Callable[..., list[Example]]], tuple[dict[str, list[Example]], dict]]


@dataclass(frozen=True)
class EvaluationSpec:
    """How a dataset is scored; the evaluation runner and `lorasens score` read only this."""

    # prediction rows ({id, prompt, prediction, references, + row_fields}) -> metrics; the one scorer of a dataset
    score_rows: Callable[[list[dict]], dict]
    # Where a generation ends besides EOS: every built-in dataset's answer is one line (the next line would be a
    # new, unrelated prompt).
    stop_strings: tuple[str, ...] = ("\n",)
    needs_meteor: bool = False  # METEOR (Java, else WordNet for meteor_nltk): checked before training, not after it
    row_fields: Callable[[Example], dict] | None = None  # extra fields of a predictions row (WikiSQL: its table)
    label_choices: tuple[str, ...] = ()  # also scored by label log-likelihood (rows get `ll_prediction`, `subset`)
    eval_sets: EvalSetsHook | None = None  # default: one set, named after the split
    # prediction rows -> {metric: per-prompt statistics} (metrics.segments), for validate's bootstrap; None: the
    # dataset's metrics are not resampled (validate compares loss only)
    segment_rows: Callable[[list[dict]], dict] | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    # (split, data_dir or None for the Hub, seed) -> examples; raises UserError for missing files/columns
    load: Callable[[Split, Path | None, int], list[Example]]
    evaluation: EvaluationSpec
    max_new_tokens: int = 64
    needs_data_dir: bool = False  # True when there is no Hub fallback
    # Examples held out of the train split for the ablation (`--analysis_samples` default): enough for a bootstrap
    # interval, few enough that an ablation pass per module stays cheap.
    analysis_samples: int = 200
    # A dataset the user describes with flags (custom): (name as given, the run's DataConfig or None for the
    # defaults) -> this spec with `load` and `evaluation` bound to those settings. Built-in datasets have none.
    configure: Callable[[str, Any], DatasetSpec] | None = None
    # Names starting with this also resolve to this spec (custom: "hf:org/name[:config]").
    name_prefix: str | None = None


DATASETS: dict[str, DatasetSpec] = {}
# Modules that register datasets; imported lazily so that `import lorasens` stays light.
_DATASET_MODULES = ("lorasens.data.e2e", "lorasens.data.synthetic", "lorasens.data.samsum", "lorasens.data.wikisql",
                    "lorasens.data.mnli", "lorasens.data.custom")


def register(spec: DatasetSpec) -> DatasetSpec:
    DATASETS[spec.name] = spec
    return spec


def registered_datasets() -> dict[str, DatasetSpec]:
    """Every dataset, by name (importing the dataset modules registers them)."""
    for module in _DATASET_MODULES:
        importlib.import_module(module)
    return DATASETS


def get_dataset_spec(name: str, options: Any = None) -> DatasetSpec:
    """The spec registered as `name` (or whose `name_prefix` starts it). `options` (the run's `DataConfig`) binds a
    configurable dataset to the run's settings; without it such a dataset gets its defaults."""
    datasets = registered_datasets()
    spec = datasets.get(name) or next(
        (s for s in datasets.values() if s.name_prefix and name.startswith(s.name_prefix)), None)
    if spec is None:
        raise unknown_choice("dataset", name, datasets)
    return spec.configure(name, options) if spec.configure is not None else spec


def load_examples(
    name: str, split: Split, data_dir: str | Path | None = None, seed: int = 0, limit: int | None = None,
    options: Any = None,
) -> list[Example]:
    """Examples of one split; `limit` takes a deterministic (seeded) subset, keeping file order. `options` (the
    run's `DataConfig`) configures datasets that read more than `data_dir` (custom)."""
    spec = get_dataset_spec(name, options)
    if split not in SPLITS:
        raise unknown_choice("split", split, SPLITS)
    folder = None
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise UserError(f"--data_dir {str(folder)!r} does not exist or is not a folder")
    elif spec.needs_data_dir:
        raise UserError(f"dataset {name!r} needs --data_dir")
    examples = spec.load(split, folder, seed)
    if not examples:
        raise UserError(f"dataset {name!r} split {split!r} is empty")
    return subset(examples, limit, seed)


def training_splits(name: str, data_dir: str | Path | None, seed: int, train_samples: int | None,
                    analysis_samples: int | None, options: Any = None) -> tuple[list[Example], list[Example]]:
    """(train, analysis): the analysis split is carved out of the train split, disjoint from it *by prompt*.

    Prompts are ordered by a stable hash (crc32, the same on every machine and for every seed) and whole prompts
    (with all their references) go to the analysis split until it holds `analysis_samples` examples (default: the
    dataset's own); the rest is the train split, of which `train_samples` are then drawn as before. Validation and
    test are separate splits already, so the analysis split is disjoint from all three.
    """
    spec = get_dataset_spec(name, options)
    examples = load_examples(name, "train", data_dir, seed, None, options=options)
    wanted = analysis_samples
    if wanted is None:  # the default scales with the data: a small dataset needs no flag to start
        wanted = min(spec.analysis_samples, max(MIN_ANALYSIS_SAMPLES, len(examples) // 10), max(1, len(examples) // 2))
        if wanted < spec.analysis_samples:
            logger.info("analysis split: %d of the %d training examples (default: 10%% of them, at least %d, at most "
                        "%d; set --analysis_samples to choose)", wanted, len(examples), MIN_ANALYSIS_SAMPLES,
                        spec.analysis_samples)
    prompts = sorted(dict.fromkeys(ex.prompt for ex in examples), key=lambda p: (stable_bucket(p, 2**32), p))
    per_prompt: dict[str, int] = {}
    for ex in examples:
        per_prompt[ex.prompt] = per_prompt.get(ex.prompt, 0) + 1
    held: set[str] = set()
    count = 0
    for prompt in prompts:
        if count >= wanted:
            break
        held.add(prompt)
        count += per_prompt[prompt]
    train = [ex for ex in examples if ex.prompt not in held]
    analysis = [ex for ex in examples if ex.prompt in held]
    if not train and len(prompts) == 1:
        raise UserError(f"dataset {name!r}: all {len(examples)} training examples have the same prompt (one distinct "
                        "row); the analysis split is held out by prompt, so at least 2 distinct prompts are needed")
    if not train:
        raise UserError(f"dataset {name!r}: --analysis_samples {wanted} leaves no training examples of "
                        f"{len(examples)} ({len(prompts)} distinct prompts); lower it")
    return subset(train, train_samples, seed), analysis


MIN_ANALYSIS_SAMPLES = 20  # the default analysis split's floor (bootstrap CIs over fewer examples are too wide)


def subset(items: list, limit: int | None, seed: int) -> list:
    if limit is None or limit >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def group_by_prompt(examples: list[Example]) -> list[Example]:
    """One example per distinct prompt with all its references (the E2E way of scoring), first-seen order.

    Duplicate references stay, as the official E2E scorer keeps them (they weigh in BLEU/NIST counts and CIDEr).
    Examples that all carry the same multi-reference tuple (the loaders give every row of an MR all of its
    references) contribute it once; otherwise (one reference per row) the references are concatenated.
    """
    grouped: dict[str, list[Example]] = {}
    for ex in examples:
        grouped.setdefault(ex.prompt, []).append(ex)
    out = []
    for group in grouped.values():
        tuples = [tuple(ex.references or (ex.target,)) for ex in group]
        shared = len(set(tuples)) == 1 and (len(group) == 1 or len(tuples[0]) > 1)
        refs = tuples[0] if shared else tuple(r for t in tuples for r in t)
        out.append(dataclasses.replace(group[0], references=refs))
    return out


def read_csv_rows(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a CSV file; malformed rows, missing columns or an empty file are `UserError`s naming file and line."""
    return [row for _, row in read_table_records(path, required)]
