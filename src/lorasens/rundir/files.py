"""Every file name of a run directory, defined once (the JSON readers and writers are in `lorasens.safeio`).

Writers (run, training callbacks, analysis, evaluation, report) and readers (plots, report, compare, sweep,
`load_run`) import the names from here, so a file can never be written under one name and looked for under another.
Plot PNG names are the keys of `lorasens.presentation.plots.RUN_PLOTS` (the plot registry owns them).
"""

from __future__ import annotations

from pathlib import Path

# The run itself
CONFIG_FILE = "config.json"  # the resolved config; what eval/analyze/report/--resume rebuild a run from
SUMMARY_FILE = "summary.json"  # written last: its presence means "the run finished"
RUN_LOG = "run.log"
TRAIN_LOG = "train_log.jsonl"
EVAL_LOG = "eval_log.jsonl"
PHASES = "phases.json"
CHECKPOINTS = "checkpoints"
FINAL_MODEL = "final_model"
REPORT_FILE = "report.html"
LOCK_FILE = ".lorasens.lock"  # present while a process writes into the run (rundir.lock)

# A PEFT adapter folder (final_model/, each checkpoint) and the Trainer's state in a checkpoint (written last)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINER_STATE = "trainer_state.json"

# Evaluation: one pair per dataset, e.g. e2e_predictions.jsonl and e2e_evaluation.json
PREDICTIONS_SUFFIX = "_predictions.jsonl"
EVALUATION_SUFFIX = "_evaluation.json"


def _file_stem(dataset: str) -> str:
    """A dataset name as a file name: `hf:org/name` -> `hf_org_name` (no folder separators or colons)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in dataset)


def predictions_file(dataset: str) -> str:
    return f"{_file_stem(dataset)}{PREDICTIONS_SUFFIX}"


def evaluation_file(dataset: str) -> str:
    return f"{_file_stem(dataset)}{EVALUATION_SUFFIX}"


# Analysis. The first two names are the ones of the tool lorasens replaces; keep them.
GROUP_NORMS = "gradient_analysis.group_norms.csv"
LAYER_NORMS = "gradient_analysis.layer_norms.csv"
MODULE_NORMS = "gradient_analysis.module_norms.csv"
IMPORTANCE = "importance.csv"
UPDATE_MAGNITUDE = "update_magnitude.csv"
ABLATION = "sensitivity_ablation.csv"
SENSITIVITY = "sensitivity.json"
RECOMMENDED_CONFIG = "recommended_lora_config.json"
# `lorasens validate`: a folder (RUN_DIR/validation by default) with these files.
VALIDATION_DIR = "validation"
VALIDATION_CSV = "placement_validation.csv"
VALIDATION_JSON = "placement_validation.json"
VALIDATION_PNG = "placement_validation.png"
VALIDATION_SWEEP_CSV = "sweep.csv"
VALIDATION_PLAN = "plan.json"  # the arms and settings of a validation folder
VALIDATION_TEST_SCORES = "test_scores.json"  # per-prompt test scores of one validation training  # validation loss per arm and learning rate

GROUP_NORMS_COLUMNS = ("step", "phase", "attn", "mlp", "total")
LAYER_NORMS_COLUMNS = ("step", "phase", "layer", "attn", "mlp")
MODULE_NORMS_COLUMNS = ("step", "phase", "layer", "group", "module", "matrix", "grad_norm")
IMPORTANCE_COLUMNS = ("step", "phase", "layer", "group", "module", "importance")
UPDATE_MAGNITUDE_COLUMNS = ("step", "phase", "layer", "group", "module", "delta_w_norm")
ABLATION_COLUMNS = ("kind", "name", "layer", "group", "module", "num_modules", "loss", "delta_loss",
                    "delta_ci_low", "delta_ci_high", "rank", "rank_low", "rank_high")
VALIDATION_COLUMNS = ("arm", "family", "kind", "seed", "lr", "steps", "num_modules", "lora_params",
                      "initial_lora_params", "validation_loss", "test_loss", "late_eval_fall", "train_runtime_s")

# Files a run directory may hold; a folder with none of them (and no evaluation file) is not a run.
RUN_FILES = (CONFIG_FILE, SUMMARY_FILE, TRAIN_LOG, EVAL_LOG, PHASES, GROUP_NORMS, LAYER_NORMS, MODULE_NORMS,
             SENSITIVITY, ABLATION, RECOMMENDED_CONFIG)


# config.json / summary.json of a run recorded by `lorasens.SensitivityCallback` in a user's own training script:
# {"recorder", "trainer", "unknown_fields": ["data.dataset", ...]}: the settings the script did not tell lorasens.
RECORDED_BY = "recorded_by"


def unknown_fields(config: dict | None) -> set[str]:
    """"section.field" names of the settings a run recorded in a user's script could not know (none for a
    `lorasens train` run): their values in config.json are defaults or "unknown", never facts."""
    recorded = (config or {}).get(RECORDED_BY)
    return set(recorded.get("unknown_fields", [])) if isinstance(recorded, dict) else set()


def module_key(layer: int, module_type: str) -> str:
    """The key of one (layer, module) in sensitivity.json, e.g. "L3.q_proj"."""
    return f"L{layer}.{module_type}"


def evaluation_files(run_dir: Path) -> list[Path]:
    return sorted(Path(run_dir).glob(f"*{EVALUATION_SUFFIX}"))
