"""Evaluation of a model on a dataset's held-out split: generate, write predictions, score, write the summary.

`evaluate_model` is the one path: evaluation after training (`evaluate_after_training`), `lorasens eval RUN_DIR`
and the Python API all call it. What is evaluated: the `num_samples` (default `--eval_samples`) distinct prompts
of the split, chosen by a seeded subset *after* grouping references per prompt, so E2E gets one prediction per
MR scored against all of its references. MNLI is scored on dev matched and, when available, dev mismatched, by
label log-likelihood and by generated label. Files: RUN_DIR/{dataset}_predictions.jsonl and
RUN_DIR/{dataset}_evaluation.json.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from lorasens.config import ExperimentConfig
from lorasens.data.features import prompt_input
from lorasens.data.prepare import examples as split_examples
from lorasens.data.prepare import templated
from lorasens.data.registry import EvaluationSpec, Example, get_dataset_spec, group_by_prompt, subset
from lorasens.errors import UserError, unknown_choice
from lorasens.evaluation.generation import generate, label_loglikelihoods
from lorasens.evaluation.predictions import score_rows, write_rows
from lorasens.rundir.files import evaluation_file, predictions_file
from lorasens.safeio import write_json
from lorasens.training.context import RunContext

logger = logging.getLogger(__name__)

EVAL_SPLITS = ("validation", "test")  # never "train": scores on training data say nothing about generalisation


@dataclass
class EvalSettings:
    split: str
    num_samples: int
    batch_size: int
    max_new_tokens: int
    num_beams: int
    max_prompt_tokens: int
    seed: int

    def __post_init__(self):
        if self.split not in EVAL_SPLITS:
            raise unknown_choice("evaluation split", self.split, EVAL_SPLITS)
        for name in ("num_samples", "batch_size", "max_new_tokens", "num_beams"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be > 0, got {getattr(self, name)}")

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def settings_from_config(cfg: ExperimentConfig, split: str = "test", num_samples: int | None = None,
                         batch_size: int | None = None) -> EvalSettings:
    spec = get_dataset_spec(cfg.data.dataset)
    return EvalSettings(
        split=split,
        num_samples=num_samples if num_samples is not None else cfg.data.eval_samples,
        batch_size=batch_size if batch_size is not None else cfg.evaluation.eval_batch_size,
        max_new_tokens=cfg.evaluation.max_new_tokens or spec.max_new_tokens,
        num_beams=cfg.evaluation.num_beams,
        # The longest prompt training could have seen; longer prompts are cut from the left, as in training.
        max_prompt_tokens=cfg.data.max_length,
        seed=cfg.training.seed,
    )


def eval_examples(cfg, split: str, num_samples: int, seed: int, examples: list[Example] | None = None) -> list[Example]:
    """`num_samples` distinct prompts of `split` (all references of each), a seeded subset in file order."""
    examples = split_examples(cfg.data, split, seed) if examples is None else templated(cfg.data, examples)
    return subset(group_by_prompt(examples), num_samples, seed)


def _rows(examples: list[Example], predictions: list[str], evaluation: EvaluationSpec) -> list[dict]:
    rows = []
    for ex, pred in zip(examples, predictions):
        row = {"id": ex.id, "prompt": ex.prompt, "prediction": pred, "references": list(ex.references or (ex.target,))}
        if evaluation.row_fields is not None:
            row.update(evaluation.row_fields(ex))
        rows.append(row)
    return rows


def _predict(model, tokenizer, dataset: str, sets: dict[str, list[Example]], s: EvalSettings, label: str) -> list[dict]:
    """Prediction rows for every evaluation set (MNLI: matched/mismatched; others: one set)."""
    evaluation = get_dataset_spec(dataset).evaluation
    rows: list[dict] = []
    for name, examples in sets.items():
        prompts = [prompt_input(tokenizer, ex) for ex in examples]  # text, or a chat prompt's token ids
        preds = generate(model, tokenizer, prompts, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
                         num_beams=s.num_beams, stop_strings=evaluation.stop_strings,
                         max_prompt_tokens=s.max_prompt_tokens, desc=f"{label} {dataset} {name}")
        part = _rows(examples, preds, evaluation)
        labels = evaluation.label_choices
        if labels:
            scores = label_loglikelihoods(model, tokenizer, prompts, labels, batch_size=s.batch_size,
                                          max_prompt_tokens=s.max_prompt_tokens, desc=f"{label} {dataset} {name} labels")
            for row, sc in zip(part, scores):
                row["subset"] = name
                row["ll_prediction"] = labels[max(range(len(labels)), key=sc.__getitem__)]
        rows.extend(part)
    return rows


def _eval_sets(cfg: ExperimentConfig, s: EvalSettings) -> tuple[dict[str, list[Example]], dict]:
    """The example sets to evaluate and the metrics of sets that are unavailable (the dataset's hook decides)."""
    def select(examples: list[Example] | None = None) -> list[Example]:
        return eval_examples(cfg, s.split, s.num_samples, s.seed, examples=examples)

    hook = get_dataset_spec(cfg.data.dataset).evaluation.eval_sets
    if hook is None:
        return {s.split: select()}, {}
    data_dir = Path(cfg.data.data_dir).expanduser() if cfg.data.data_dir else None
    return hook(s.split, data_dir, select)


def evaluate_model(model, tokenizer, cfg, settings: EvalSettings, baseline: bool = False, run_dir: str | Path | None = None,
                   examples: list[Example] | None = None) -> dict:
    """Generate and score; returns (and, with `run_dir`, writes) the {dataset}_evaluation.json content.

    `examples` replaces the split's seeded subset (grouped by prompt already; `lorasens validate` passes its test set).
    """
    started = time.time()
    dataset = cfg.data.dataset
    if examples is not None:
        sets, unavailable = {settings.split: examples}, {}
    else:
        sets, unavailable = _eval_sets(cfg, settings)
    count = sum(len(v) for v in sets.values())
    logger.info("Evaluating %s (%s): %d prompts, batch %d, max_new_tokens %d, %s", dataset, settings.split, count,
                settings.batch_size, settings.max_new_tokens, "greedy" if settings.num_beams == 1 else f"{settings.num_beams} beams")
    was_training = model.training
    model.eval()
    try:
        rows = _predict(model, tokenizer, dataset, sets, settings, "lora" if _has_adapter(model) else "model")
        metrics = {**score_rows(dataset, rows, cfg.data), **unavailable}
        baseline_result = None
        if baseline:
            if not _has_adapter(model):
                raise UserError("--baseline needs a model with a LoRA adapter (the baseline is the model without it)")
            with model.disable_adapter():
                base_rows = _predict(model, tokenizer, dataset, sets, settings, "base")
            baseline_result = {"metrics": {**score_rows(dataset, base_rows, cfg.data), **unavailable}}
            for row, base in zip(rows, base_rows):
                row["baseline_prediction"] = base["prediction"]
                if "ll_prediction" in base:
                    row["baseline_ll_prediction"] = base["ll_prediction"]
    finally:
        model.train(was_training)
    result = {
        "dataset": dataset,
        "split": settings.split,
        "num_examples": count,
        "metrics": metrics,
        "baseline": baseline_result,
        "settings": settings.as_dict(),
        "wall_time_s": round(time.time() - started, 2),
    }
    if run_dir is not None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_rows(run_dir / predictions_file(dataset), rows)
        write_json(run_dir / evaluation_file(dataset), result)
    logger.info("Evaluation %s: %s (%.1f s)", dataset, format_metrics(metrics), result["wall_time_s"])
    if baseline_result:
        logger.info("Baseline (no LoRA): %s", format_metrics(baseline_result["metrics"]))
    return result


def _has_adapter(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def format_metrics(metrics: dict) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        elif value is None:
            parts.append(f"{key} n/a")
        elif isinstance(value, int):
            parts.append(f"{key} {value}")
    return ", ".join(parts)


def evaluate_after_training(ctx: RunContext) -> dict:
    """Step after training in run_experiment: scores the final adapter on the test split."""
    cfg = ctx.cfg
    if not cfg.evaluation.evaluate:
        return {}
    settings = settings_from_config(cfg, "test")
    result = evaluate_model(ctx.model, ctx.tokenizer, cfg, settings, cfg.evaluation.baseline, ctx.run_dir)
    summary = {"evaluation": result["metrics"]}
    if result["baseline"] is not None:
        summary["evaluation_baseline"] = result["baseline"]["metrics"]
    return summary
