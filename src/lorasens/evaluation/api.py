"""Python API: `evaluate_e2e`, `evaluate_samsum`, `evaluate_wikisql`, `evaluate_mnli` -> a dict of metrics.

    from lorasens.evaluation import evaluate_wikisql
    metrics = evaluate_wikisql(model_path="runs/wikisql_both", num_samples=200, batch_size=16,
                               data_dir="../shared/data/wikisql")
    metrics["logical_form_accuracy"], metrics["execution_accuracy"]

`model_path` is a lorasens run directory, a PEFT adapter folder (its base model: `base_model_id`, else the one
recorded in adapter_config.json), or a full model (alias, Hub id, local folder); with `model_path=None` the base
model `base_model_id` alone is scored. `output_dir` also writes the predictions and evaluation files there.
A run evaluated on its own dataset keeps the run's data settings — data_dir, max_length (prompts are cut from the
left to it), prompt_template and, for your own data, its files, fields and metrics — unless they are given;
otherwise max_length defaults to 512. Your own data without a run: `evaluate_dataset("custom", ...,
data_options={"data_files": "qa.jsonl", "target_field": "answer", "metrics": "exact_match"})` (DataConfig fields).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from peft import PeftModel

from lorasens.config import DataConfig, EvaluationConfig, ExperimentConfig, TrainingConfig
from lorasens.data.registry import get_dataset_spec
from lorasens.errors import UserError
from lorasens.evaluation.runner import evaluate_model, settings_from_config
from lorasens.model.loading import load_model
from lorasens.rundir.files import ADAPTER_CONFIG, CONFIG_FILE, FINAL_MODEL
from lorasens.safeio import read_json
from lorasens.training.context import load_run


def _load(model_path: str | None, base_model_id: str | None, precision: str):
    """(model, tokenizer, the run's config or None)."""
    if model_path is None:
        if base_model_id is None:
            raise UserError("give model_path (run directory, adapter folder or model) or base_model_id")
        loaded = load_model(base_model_id, precision)
        return loaded.model, loaded.tokenizer, None
    path = Path(model_path).expanduser()
    if (path / CONFIG_FILE).exists() and (path / FINAL_MODEL).is_dir():
        run = load_run(path)
        return run.model, run.tokenizer, run.cfg
    if (path / ADAPTER_CONFIG).exists():
        base = base_model_id or read_json(path / ADAPTER_CONFIG, "adapter config").get("base_model_name_or_path")
        if not base:
            raise UserError(f"{path}/{ADAPTER_CONFIG} names no base model; pass base_model_id")
        loaded = load_model(base, precision)
        return PeftModel.from_pretrained(loaded.model, path).eval(), loaded.tokenizer, None
    loaded = load_model(str(model_path), precision)
    return loaded.model, loaded.tokenizer, None


def evaluate_dataset(
    dataset: str,
    model_path: str | None = None,
    base_model_id: str | None = None,
    num_samples: int = 200,
    batch_size: int = 16,
    *,
    data_dir: str | None = None,
    split: str = "test",
    max_new_tokens: int | None = None,
    num_beams: int = 1,
    max_length: int | None = None,
    prompt_template: str | None = None,
    baseline: bool = False,
    seed: int = 42,
    precision: str = "auto",
    output_dir: str | None = None,
    data_options: dict | None = None,
) -> dict:
    get_dataset_spec(dataset)
    model, tokenizer, run_cfg = _load(model_path, base_model_id, precision)
    given = {k: v for k, v in {"data_dir": data_dir, "max_length": max_length, "prompt_template": prompt_template,
                                **(data_options or {})}.items() if v is not None}
    if run_cfg is not None and run_cfg.data.dataset == dataset:
        # What training saw: the same files, fields, prompt length, template (and custom data's metrics).
        data = dataclasses.replace(run_cfg.data, **given)
    else:
        data = DataConfig(dataset=dataset, **{"max_length": 512, **given})
    cfg = ExperimentConfig(data=data, evaluation=EvaluationConfig(max_new_tokens=max_new_tokens, num_beams=num_beams),
                           training=TrainingConfig(seed=seed))
    settings = settings_from_config(cfg, split, num_samples, batch_size)
    result = evaluate_model(model, tokenizer, cfg, settings, baseline, output_dir)
    metrics = dict(result["metrics"])
    if result["baseline"] is not None:
        metrics["baseline"] = result["baseline"]["metrics"]
    return metrics


def evaluate_e2e(model_path: str | None = None, base_model_id: str | None = None, num_samples: int = 200,
                 batch_size: int = 16, **kwargs) -> dict:
    """E2E NLG: bleu, nist, meteor, rouge_l, cider (one prediction per MR against all its references)."""
    return evaluate_dataset("e2e", model_path, base_model_id, num_samples, batch_size, **kwargs)


def evaluate_samsum(model_path: str | None = None, base_model_id: str | None = None, num_samples: int = 200,
                    batch_size: int = 16, **kwargs) -> dict:
    """SAMSum: rouge1, rouge2, rougeL, rougeLsum, bleu, meteor."""
    return evaluate_dataset("samsum", model_path, base_model_id, num_samples, batch_size, **kwargs)


def evaluate_wikisql(model_path: str | None = None, base_model_id: str | None = None, num_samples: int = 200,
                     batch_size: int = 16, **kwargs) -> dict:
    """WikiSQL: logical_form_accuracy (official `Query` equality), execution_accuracy (None without table rows),
    exact_string_match."""
    return evaluate_dataset("wikisql", model_path, base_model_id, num_samples, batch_size, **kwargs)


def evaluate_mnli(model_path: str | None = None, base_model_id: str | None = None, num_samples: int = 200,
                  batch_size: int = 16, **kwargs) -> dict:
    """MNLI: accuracy_matched / accuracy_mismatched (label log-likelihood) and generated_accuracy_* ."""
    return evaluate_dataset("mnli", model_path, base_model_id, num_samples, batch_size, **kwargs)
