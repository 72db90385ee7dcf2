"""Experiment configuration: nested, typed dataclasses with a help text per field.

Every field is also a CLI flag of the same name (`--r`, `--lora_alpha`, ...), so the flag names are defined once,
here. Values are resolved in this order: defaults < preset < config file (YAML/JSON) < CLI flags. Unknown keys are
errors that list the valid ones. Every section checks its own fields in `__post_init__` and `ExperimentConfig` the
ones that span sections, so no path can build an invalid config (CLI, file, `config_from_dict`, `with_overrides`);
`check_environment` checks what depends on the machine (dataset and model names, optional packages).

Field categories live in the field's metadata (`opt(..., resumable=True)`), never in parallel lists of names:
- resumable: may differ between a run and its `--resume`;
- reanalysable: may be overridden by `lorasens analyze`;
- schedule_only: only meaningful with a phase schedule (a sweep drops them from static grid points);
- not_a_setting: does not change what is learnt (`compare` pools runs that differ only here, e.g. seeds);
- key: (position, label) of a key setting: shown in the report's settings table and in `compare`'s tables;
- custom_data: describes your own data (--dataset custom / hf:ORG/NAME); an error with any other dataset.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from lorasens.data.registry import get_dataset_spec
from lorasens.errors import UserError, unknown_choice
from lorasens.presets import get_preset
from lorasens.safeio import read_text, write_json

Target = Literal["attn", "mlp", "both"]
TARGET_ALIASES = {"attention": "attn"}
FinalAdapter = Literal["best", "last"]
LrScheduler = Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"]
ReportTo = Literal["none", "tensorboard", "wandb", "mlflow"]
Precision = Literal["auto", "fp32", "bf16"]
Quantize = Literal["none", "4bit"]
Fsdp = Literal["none", "full_shard", "shard_grad_op", "hybrid_shard"]
Allocate = Literal["modules", "ranks", "spread", "types"]
BudgetUnit = Literal["params", "modules"]  # what --budget counts (analysis.budget)
RecommendInit = Literal["default", "eva"]  # how the recommended config's LoRA starts
# Generation metrics of a custom dataset (--metrics); lorasens.metrics.TEXT_METRIC_FUNCTIONS scores them.
TextMetric = Literal["exact_match", "rouge_l", "bleu", "accuracy"]
DEFAULT_TEXT_METRICS = ("exact_match", "rouge_l", "bleu")
CUSTOM_DATASET, HUB_PREFIX = "custom", "hf:"
DEFAULT_HELD_OUT_FRACTION = 0.1  # custom data: --validation_fraction / --test_fraction when not given


CATEGORIES = ("resumable", "reanalysable", "schedule_only", "not_a_setting", "custom_data")


def opt(default: Any, help: str, *, key: tuple[int, str] | None = None, aliases: tuple[str, ...] = (),
        **categories: bool) -> Any:
    """A dataclass field with a help text (shown by `--help` and in docs/GUIDE.md) and its categories.

    `aliases` are further flag spellings of the field (e.g. `--lora_r` for `--r`, which launchers misread)."""
    unknown = set(categories) - set(CATEGORIES)
    assert not unknown, f"unknown field categories {unknown}"
    metadata = {"help": help, "key": key, "aliases": aliases, **categories}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    model: str = opt(
        "tinyllama",
        "Causal LM: an alias (tinyllama, smollm2-135m, tiny-random-llama), a Hugging Face Hub id, or a local path.",
        key=(0, "model"),
    )
    attn_modules: str | None = opt(
        None, "Comma list of attention linear-module names, for architectures the module map does not know."
    )
    mlp_modules: str | None = opt(None, "Comma list of MLP linear-module names, for unknown architectures.")
    precision: Precision = opt(
        "auto", "auto = bf16 on a CUDA GPU that supports it, else fp32. bf16 on a CPU with native bf16 (AVX512-BF16 or "
        "AMX): training steps compute under bf16 autocast, weights, analysis and evaluation stay fp32.")
    quantize: Quantize = opt(
        "none", "4bit = QLoRA: the base model's linear layers in NF4 (bitsandbytes, also on CPU), computing in the "
        "--precision dtype; LoRA and the LM head stay in full precision."
    )


@dataclass
class LoraSettings:
    target: Target = opt("both", "Module groups that get LoRA: attn, mlp or both (attention = attn).", key=(2, "LoRA target"))
    # `--r` alone is an ambiguous prefix to torchrun's own parser (--rdzv-*, --role, --run_path, --redirects), which
    # classifies every argument, the script's too: under launchers the rank is `--lora_r`.
    r: int = opt(8, "LoRA rank (also --lora_r, the spelling that passes through torchrun).", key=(5, "rank r"),
                 aliases=("--lora_r",))
    lora_alpha: float = opt(16.0, "LoRA alpha; the update is scaled by lora_alpha / r.", key=(6, "lora_alpha"))
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input, in [0, 1).", key=(7, "lora_dropout"))
    placement: str | None = opt(
        None, "A JSON file of peft.LoraConfig arguments (e.g. a run's recommended_lora_config.json; also "
        "init_lora_weights gaussian or eva, or peft_type ADALORA): LoRA goes on exactly the modules it selects, at "
        "its ranks (rank_pattern), instead of on --target. Its r (AdaLoRA: init_r) and lora_alpha are the run's --r "
        "and --lora_alpha; given ones must be equal."
    )

    def __post_init__(self):
        _positive("r", self.r)
        _positive("lora_alpha", self.lora_alpha)
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class DataConfig:
    dataset: str = opt("e2e", "Dataset name (see `lorasens datasets`), or your own data: custom (files, see "
                       "--data_dir / --data_files) or hf:ORG/NAME[:CONFIG] (a Hub dataset).", key=(1, "dataset"))
    data_dir: str | None = opt(None, "Local folder with the dataset's official files; default: the Hugging Face Hub. "
                               "custom: the folder holding train / validation / test (.jsonl, .csv or .parquet).")
    max_length: int = opt(256, "Maximum tokens per training example (prompt + target); prompts are cut first.",
                          key=(12, "max_length"))
    train_samples: int | None = opt(None, "Use a deterministic subset of this many training examples.")
    eval_samples: int = opt(200, "Held-out examples for validation loss and final evaluation.")
    analysis_samples: int | None = opt(
        None, "Examples held out of the train split for the ablation and first-order estimate (disjoint from "
        "train, validation and test); default: the dataset's own (see `lorasens datasets`)."
    )
    prompt_template: str | None = opt(
        None, "Prompt override, a format string over the dataset's fields, e.g. 'Dialogue: {dialogue}\\nSummary:' "
        "(see docs/GUIDE.md); default: the dataset's own template."
    )
    # Your own data (--dataset custom or hf:ORG/NAME); refused with any other dataset, never silently ignored.
    data_files: str | None = opt(
        None, "custom: the files, as SPLIT=PATH comma list (train=a.jsonl,test=b.csv), or one PATH used as train.",
        custom_data=True)
    prompt_field: str | None = opt(None, "custom: column holding the prompt (default: prompt).", custom_data=True)
    target_field: str | None = opt(None, "custom: column holding the answer the loss is on (default: completion).",
                                   custom_data=True)
    split_train: str | None = opt(None, "custom: name of the training split / file stem (default: train).",
                                  custom_data=True)
    split_validation: str | None = opt(None, "custom: name of the validation split / file stem (default: validation).",
                                       custom_data=True)
    split_test: str | None = opt(None, "custom: name of the test split / file stem (default: test).", custom_data=True)
    validation_fraction: float | None = opt(
        None, "custom without a validation split: share of the training rows held out for it, chosen by a hash of "
        "the row (default: 0.1).", custom_data=True)
    test_fraction: float | None = opt(
        None, "custom without a test split: share of the training rows held out for it, by a hash of the row "
        "(default: 0.1).", custom_data=True)
    metrics: str | None = opt(
        None, f"custom: comma list of generation metrics from {', '.join(get_args(TextMetric))} (default: "
        f"{','.join(DEFAULT_TEXT_METRICS)}).", custom_data=True)

    def __post_init__(self):
        _positive("max_length", self.max_length)
        _positive("eval_samples", self.eval_samples)
        if self.train_samples is not None:
            _positive("train_samples", self.train_samples)
        if self.analysis_samples is not None:
            _positive("analysis_samples", self.analysis_samples)
        given = [f"--{f.name}" for f in fields(self) if f.metadata.get("custom_data") and getattr(self, f.name) is not None]
        if given and not is_custom_dataset(self.dataset):
            raise UserError(f"{', '.join(given)} only apply to your own data: --dataset custom or "
                            f"hf:ORG/NAME, not {self.dataset}")
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise UserError(f"--{name} must be in (0, 1), got {value}")
        if (self.validation_fraction or DEFAULT_HELD_OUT_FRACTION) + (self.test_fraction or DEFAULT_HELD_OUT_FRACTION) >= 1:
            raise UserError("--validation_fraction + --test_fraction must leave training rows (sum < 1)")
        if self.metrics is not None:
            self.metrics = ",".join(text_metrics(self.metrics))
        if self.data_files and self.data_dir:
            raise UserError("give --data_files or --data_dir, not both")
        if self.dataset.startswith(HUB_PREFIX):
            if not self.dataset[len(HUB_PREFIX):].strip(":"):
                raise UserError(f"--dataset {self.dataset!r}: give the Hub dataset, hf:ORG/NAME or hf:ORG/NAME:CONFIG")
            if self.data_dir or self.data_files:
                raise UserError(f"--dataset {self.dataset} is read with datasets.load_dataset; drop --data_dir / "
                                "--data_files, or use --dataset custom for your files")


@dataclass
class TrainingConfig:
    batch_size: int = opt(8, "Per-device training batch size.", key=(10, "batch_size"))
    grad_accum: int = opt(1, "Gradient accumulation steps.", key=(11, "grad_accum"))
    max_steps: int = opt(1000, "Optimizer steps to train.", key=(9, "max_steps"), resumable=True)
    lr: float = opt(2e-4, "Peak learning rate (AdamW).", key=(8, "learning rate"))
    lr_scheduler: LrScheduler = opt("linear", "Learning-rate schedule (transformers names).")
    warmup_steps: int = opt(0, "Linear warm-up steps.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm; 0 disables clipping.")
    seed: int = opt(42, "Random seed (model init, data order, dropout).", key=(13, "seed"), not_a_setting=True)
    eval_steps: int = opt(100, "Validation loss every N steps; 0 = never.", resumable=True)
    save_steps: int = opt(0, "Trainer checkpoint every N steps (needed for --resume); 0 = never.", resumable=True,
                          not_a_setting=True)
    logging_steps: int = opt(1, "Log loss/lr/grad_norm to train_log.jsonl every N steps.", resumable=True,
                             not_a_setting=True)
    gradient_checkpointing: bool = opt(False, "Non-reentrant activation checkpointing (less memory, more compute).")
    fsdp: Fsdp = opt(
        "none", "FSDP2 sharding under torchrun / accelerate launch on GPUs (full_shard = ZeRO-3-like, shard_grad_op = "
        "ZeRO-2-like, hybrid_shard); decoder layers are the wrapping unit. Gradient measures stay exact.",
        not_a_setting=True,
    )
    deepspeed: str | None = opt(
        None, "DeepSpeed JSON config (e.g. examples/deepspeed_zero3.json), passed to the Trainer; GPUs only. "
        "Gradient norms and importance are not recorded under DeepSpeed.", not_a_setting=True,
    )
    report_to: ReportTo = opt("none", "Also report to this tracker (passed to the Trainer).", resumable=True,
                              not_a_setting=True)
    packing: bool = opt(
        True, "Padding-free batches: the examples of a batch flattened into one row (no compute on padding). Used "
        "when a start-up probe finds one batch's loss the same packed and padded, else padding (logged).",
        # Same examples per batch, same numbers (to float rounding): it changes the cost, not what is learnt.
        resumable=True, not_a_setting=True,
    )
    final_adapter: FinalAdapter = opt(
        "best", "Which adapter final_model holds: best (lowest validation loss, when --eval_steps > 0) or last (the "
        "last step's)."
    )
    group_by_length: bool = opt(
        False, "Batch training examples of similar length (less padding; changes which examples share a batch)."
    )

    def __post_init__(self):
        for name in ("lr", "max_steps", "batch_size", "grad_accum", "logging_steps"):
            _positive(name, getattr(self, name))
        for name in ("warmup_steps", "eval_steps", "save_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise UserError("--weight_decay and --max_grad_norm must be >= 0")


@dataclass
class ScheduleConfig:
    dynamic_lora: bool = opt(False, "Switch LoRA modules on and off in phases (needs --phase_strategy); set from "
                             "--phase_strategy when not given.")
    phase_strategy: str | None = opt(
        None, "Phase schedule, e.g. both->mlp->attn, early->late, attn@0-10->mlp@11-21, lisa:layers=2,interval=50.",
        key=(3, "phase strategy"),
    )
    phase1_end: int | None = opt(None, "Step at which phase 1 ends.", schedule_only=True)
    phase2_end: int | None = opt(None, "Step at which phase 2 ends.", schedule_only=True)
    phase_ends: str | None = opt(None, "Comma list of phase end steps (300,600) or fractions of max_steps (0.2,0.4).",
                                 key=(4, "phase ends"), schedule_only=True)
    reset_optimizer_on_switch: bool = opt(
        False, "Reset AdamW state of modules that become trainable again (default: keep it).", schedule_only=True
    )

    def __post_init__(self):
        if self.dynamic_lora and not self.phase_strategy:
            raise UserError("--dynamic_lora needs --phase_strategy (e.g. both->mlp->attn); see `lorasens strategies`")
        # Derived at construction: a strategy means a dynamic run, so config.json says so (and --resume compares equal).
        self.dynamic_lora = bool(self.phase_strategy)
        if not self.phase_strategy:
            given = [f"--{f.name}" for f in fields(self) if f.metadata.get("schedule_only") and getattr(self, f.name)
                     not in (None, False)]
            if given:
                raise UserError(f"{', '.join(given)} only apply to a phase schedule; add --phase_strategy (e.g. both->mlp->attn)")


@dataclass
class TrackingConfig:
    track_gradients: bool = opt(True, "Record per-module LoRA gradient norms.")
    grad_log_interval: int = opt(1, "Record gradient norms every N optimizer steps.")
    track_importance: bool = opt(True, "Record first-order Taylor importance |theta * grad| (bias-corrected EMA).")
    track_update_magnitude: bool = opt(True, "Record ||delta W||_F = scaling * ||B A||_F per module.")
    importance_ema: float = opt(0.85, "EMA factor for importance smoothing (as AdaLoRA's beta1).")
    ablation: bool = opt(True, "Run the ablation study after training.", reanalysable=True)
    ablation_max_single: int = opt(64, "At most this many single (layer, module) ablations.", reanalysable=True)
    budget: float | None = opt(
        None, "Recommendation budget in --budget_unit: a count (>= 1) or a fraction (< 1) of the all-modules total. "
        "Default: 0.5.", reanalysable=True,
    )
    budget_unit: BudgetUnit = opt(
        "params", "What --budget counts: LoRA parameters r*(in+out) (default), or modules.", reanalysable=True,
    )
    allocate: Allocate | None = opt(
        None, "modules: LoRA on or off per module at rank --r; ranks: per-module ranks (--min_rank plus 0,1,2,4,8,16,32) "
        "in proportion to sensitivity (rank_pattern/alpha_pattern), within the same parameter budget; spread: every "
        "module at the one rank the budget holds on all of them, the most sensitive one rank higher with what is "
        "left (below rank 1 everywhere: the most sensitive modules at rank 1); types: each "
        "module group's share of the budget from the ablation's group deltas, split within the group by the "
        "module-type deltas, one rank per type in every layer (needs --ablation). Default: ranks for a budget of "
        "parameters, modules for a budget of modules.",
        reanalysable=True,
    )
    min_rank: int = opt(
        0, "With --allocate ranks: every module first gets this rank, and sensitivity places the rest of the budget "
        "on top (ranks min_rank + 0,1,2,4,...). 0: modules with low sensitivity get no LoRA.", reanalysable=True,
    )
    recommend_init: RecommendInit = opt(
        "default", "How the recommended config's LoRA starts: default (PEFT's: A random, B zero) or eva (each A from "
        "the top singular vectors of its module's inputs on training batches, every module at its recommended rank: "
        "init_lora_weights eva with rho 1; in your own script call lorasens.initialize_eva after get_peft_model).",
        reanalysable=True,
    )

    @property
    def allocation(self) -> str:
        """--allocate as it applies: spreading ranks where the budget counts parameters."""
        return self.allocate or ("ranks" if self.budget_unit == "params" else "modules")

    def __post_init__(self):
        _positive("grad_log_interval", self.grad_log_interval)
        if not 0 < self.importance_ema < 1:
            raise UserError(f"--importance_ema must be in (0, 1), got {self.importance_ema}")
        check_budget(self.budget, self.budget_unit)
        check_allocation(self.allocation, self.budget_unit, self.min_rank)
        if self.ablation_max_single < 0:
            raise UserError(f"--ablation_max_single must be >= 0, got {self.ablation_max_single}")


@dataclass
class EvaluationConfig:
    evaluate: bool = opt(True, "Generate on the held-out split and score it at the end of training.")
    eval_batch_size: int = opt(32, "Batch size for generation.", not_a_setting=True)
    max_new_tokens: int | None = opt(None, "Generation length; default: the dataset's own.")
    num_beams: int = opt(1, "Beam search width (1 = greedy).")
    baseline: bool = opt(False, "Also score the base model without LoRA.")

    def __post_init__(self):
        _positive("eval_batch_size", self.eval_batch_size)
        _positive("num_beams", self.num_beams)


@dataclass
class OutputConfig:
    # output_dir/experiment_name are resumable: the folder being resumed is the run, wherever it was moved to.
    output_dir: str = opt("runs", "Folder that holds run directories.", not_a_setting=True, resumable=True)
    experiment_name: str | None = opt(None, "Run directory name; default: derived from preset/dataset/target.",
                                      not_a_setting=True, resumable=True)
    overwrite: bool = opt(False, "Replace an existing run directory of the same name.", resumable=True,
                          not_a_setting=True)
    resume: bool = opt(False, "Continue the run in the run directory from its latest checkpoint.", resumable=True,
                       not_a_setting=True)

    def __post_init__(self):
        _check_run_name(self.experiment_name)
        if self.overwrite and self.resume:
            raise UserError("--overwrite and --resume exclude each other: one replaces the run, the other continues it")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraSettings,
    "data": DataConfig,
    "training": TrainingConfig,
    "schedule": ScheduleConfig,
    "tracking": TrackingConfig,
    "evaluation": EvaluationConfig,
    "output": OutputConfig,
}


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    preset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.output_dir) / self.experiment_name

    @property
    def experiment_name(self) -> str:
        if self.output.experiment_name:
            return self.output.experiment_name
        strategy = self.schedule.phase_strategy or self.lora.target
        base = self.preset or f"{self.data.dataset}_{self.lora.target}"
        name = base if not self.schedule.phase_strategy else f"{base}_{strategy}"
        return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)

    def __post_init__(self):
        """Checks that span sections. A schedule is parsed without a model here (its layer counts are checked
        again once the model is loaded)."""
        if self.schedule.phase_strategy:
            # Not at the top: config is imported by `lorasens --help`, and the schedule's module map imports torch
            # (seconds of start-up, see cli.py).
            from lorasens.model.schedule import parse_schedule

            s = self.schedule
            parse_schedule(s.phase_strategy, self.training.max_steps, s.phase_ends, s.phase1_end, s.phase2_end)
        if self.lora.placement is not None and self.schedule.phase_strategy:
            raise UserError("--placement and --phase_strategy exclude each other: a placement fixes the LoRA modules "
                            "for the whole run")


def check_environment(cfg: ExperimentConfig) -> ExperimentConfig:
    """What a valid config can still get wrong on this machine: unknown dataset or model, a missing package."""
    from lorasens.model.loading import check_model_name  # imports torch: not at start-up (see cli.py)

    get_dataset_spec(cfg.data.dataset)
    check_model_name(cfg.model.model)
    report_to = cfg.training.report_to
    if report_to != "none" and importlib.util.find_spec(report_to) is None:
        raise UserError(f"--report_to {report_to} needs the {report_to} package (pip install {report_to}); valid "
                        "without extra packages: none, tensorboard")
    if cfg.lora.placement is not None:
        _check_placement(cfg)
    return cfg


def check_budget(budget: float | None, unit: str) -> None:
    if budget is not None and budget <= 0:
        raise UserError(f"--budget must be > 0 (a count >= 1 or a fraction < 1), got {budget}")
    if unit == "modules" and budget is not None and budget > 1 and not float(budget).is_integer():
        raise UserError(f"--budget must be a whole count of modules (>= 1) or a fraction (< 1), got {budget}")


def check_allocation(allocate: str, unit: str, min_rank: int = 0) -> None:
    if allocate in ("ranks", "spread", "types") and unit != "params":
        raise UserError(f"--allocate {allocate} distributes a budget of LoRA parameters; use it with --budget_unit params")
    if min_rank < 0:
        raise UserError(f"--min_rank must be >= 0, got {min_rank}")
    if min_rank and allocate != "ranks":
        raise UserError(f"--min_rank {min_rank} is a floor of the per-module ranks; use it with --allocate ranks")


def is_custom_dataset(name: str) -> bool:
    """Your own data: `custom` (files) or `hf:ORG/NAME[:CONFIG]` (a Hub dataset)."""
    return name == CUSTOM_DATASET or name.startswith(HUB_PREFIX)


def text_metrics(value: str) -> tuple[str, ...]:
    """The metric names of a --metrics comma list, checked against `TextMetric`."""
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    if not names:
        raise UserError(f"--metrics needs at least one of {', '.join(get_args(TextMetric))}")
    for name in names:
        if name not in get_args(TextMetric):
            raise unknown_choice("metric", name, get_args(TextMetric))
    return names


def _check_run_name(name: str | None) -> None:
    """A run name is one folder inside --output_dir: never a path that leaves it."""
    if name is None:
        return
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UserError(f"--experiment_name must be one folder name (no '/', not '..' or empty), got {name!r}; "
                        "choose the parent folder with --output_dir")


def _check_placement(cfg: ExperimentConfig) -> None:
    """The placement file exists, and its r/alpha are the ones config.json records as --r/--lora_alpha."""
    from lorasens.model.lora import read_placement_file  # imports torch/peft: not at start-up (see cli.py)

    r, alpha = _placement_r_alpha(read_placement_file(cfg.lora.placement))
    if r != cfg.lora.r or alpha != cfg.lora.lora_alpha:
        raise UserError(f"--placement {cfg.lora.placement} has r={r}, lora_alpha={alpha}, not --r {cfg.lora.r} "
                        f"--lora_alpha {cfg.lora.lora_alpha}; leave --r/--lora_alpha out to take the file's, or pass "
                        "the same values")


def _positive(name: str, value: float) -> None:
    if value is None or not value > 0:  # `not value > 0` also refuses NaN
        raise UserError(f"--{name} must be > 0, got {value}")


# ---------------------------------------------------------------------------------------------------------------
# Field categories (from each field's metadata)


def fields_with(category: str) -> tuple[str, ...]:
    """Names of the fields marked with `category` (see the module docstring), in declaration order."""
    assert category in CATEGORIES, category
    return tuple(f.name for cls in SECTIONS.values() for f in fields(cls) if f.metadata.get(category))


def resumable_fields() -> set[str]:
    return set(fields_with("resumable"))


def key_settings() -> tuple[tuple[str, str, str], ...]:
    """(label, section, field) of the run's key settings, shown by the report and compared by `compare`."""
    keyed = [(f.metadata["key"], section, f.name) for section, cls in SECTIONS.items() for f in fields(cls)
             if f.metadata.get("key")]
    return tuple((label, section, name) for (_, label), section, name in sorted(keyed))


# ---------------------------------------------------------------------------------------------------------------
# Building a config from layered dictionaries


def field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    """Flat map flag name -> (section, field). Flag names are unique across sections by construction."""
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            assert f.name not in index, f"duplicate config field {f.name}"
            index[f.name] = (section, f)
    return index


def field_type(section: str, name: str) -> Any:
    return get_type_hints(SECTIONS[section])[name]


def coerce(section: str, name: str, value: Any) -> Any:
    """Convert a value from YAML/JSON/CLI text to the field's declared type, or raise `UserError`."""
    typ = field_type(section, name)
    optional = type(None) in get_args(typ)
    if value is None:
        if optional:
            return None
        raise UserError(f"{name} cannot be empty")
    base = next((a for a in get_args(typ) if a is not type(None)), typ) if optional else typ
    if get_origin(base) is Literal:
        choices = get_args(base)
        if name == "target":
            value = TARGET_ALIASES.get(str(value), value)
        if value not in choices:
            raise unknown_choice(name.replace("_", " "), value, choices)
        return value
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base in (int, float) and isinstance(value, bool):  # YAML `r: true` is not 1 (`--r true` is refused)
            raise ValueError
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str) and not value.lstrip("-").isdigit():
                raise ValueError
            return int(value)
        if base is float:
            number = float(value)
            if not math.isfinite(number):  # nan/inf parse as floats but no setting means them
                raise UserError(f"{name} must be a finite number, got {value!r}")
            return number
        return str(value)
    except UserError:
        raise
    except (TypeError, ValueError):
        raise UserError(f"{name} must be of type {getattr(base, '__name__', base)}, got {value!r}") from None


def normalise_overrides(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Accept both nested ({training: {lr: ..}}) and flat ({lr: ..}) dictionaries; return flat, coerced values."""
    index = field_index()
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS and not isinstance(value, dict) and key not in index:  # `model` is also a field
            raise UserError(f"section {key!r} of {source} must be a mapping of settings (e.g. {key}: {{...}}), "
                            f"got {value!r}")
        if key in SECTIONS and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                if sub_key not in index or index[sub_key][0] != key:
                    valid = [f.name for f in fields(SECTIONS[key])]
                    raise unknown_choice(f"key in section {key!r} of {source}:", sub_key, valid)
                flat[sub_key] = sub_value
        elif key == "preset":
            continue
        elif key in index:
            flat[key] = value
        else:
            raise unknown_choice(f"key in {source}:", key, list(index) + list(SECTIONS))
    return {k: coerce(index[k][0], k, v) for k, v in flat.items()}


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise UserError(f"config file {str(path)!r} must end in .yaml, .yml or .json")
    text = read_text(path)
    try:
        if path.suffix == ".json":
            data = json.loads(text, object_pairs_hook=_unique_keys)
        else:
            data = load_yaml(text) or {}
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        raise UserError(f"config file {str(path)!r} is not valid: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping of settings")
    return data


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"duplicate key(s) {', '.join(map(repr, duplicates))}")
    return dict(pairs)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load`, but a key given twice in one mapping is an error (PyYAML keeps the last one silently)."""

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node, deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return yaml.load(text, Loader=UniqueKeyLoader)


RUN_CONTROL = ("overwrite", "resume")  # what a command does with an existing run folder, not a setting of the run


def build_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    cli_overrides: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Resolve defaults < preset < file < CLI into a validated `ExperimentConfig`."""
    layers: list[dict[str, Any]] = []
    file_data = load_config_file(config_file) if config_file else {}
    if preset is None and isinstance(file_data.get("preset"), str):
        preset = file_data["preset"]
    if preset is not None:
        layers.append(normalise_overrides(get_preset(preset), f"preset {preset!r}"))
    preset_layers = len(layers)
    if file_data:
        layers.append(normalise_overrides(file_data, f"config file {str(config_file)!r}"))
    if cli_overrides:
        flags = normalise_overrides(cli_overrides, "command line")
        if any(flags.get(k) for k in RUN_CONTROL):
            # --resume or --overwrite on the command line says what this invocation does with the run folder; the
            # other one, saved in a run's config.json (`--config RUN/config.json --resume`), does not carry over.
            layers = [{k: v for k, v in layer.items() if k not in RUN_CONTROL} for layer in layers]
        layers.append(flags)
    values = {k: v for layer in layers for k, v in layer.items()}
    given = {k for layer in layers[preset_layers:] for k in layer}
    return config_from_flat({**values, **_placement_size(values, given)}, preset=preset)


def _placement_size(values: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """A placement file sizes the LoRA it describes: its r and lora_alpha become --r/--lora_alpha unless the config
    file or the command line sets them (a preset's r is not a choice about this file). Set ones must agree
    (`_check_placement`), so config.json always records the file's own values."""
    if not values.get("placement"):
        return {}
    from lorasens.model.lora import read_placement_file  # imports torch/peft: not at start-up (see cli.py)

    r, alpha = _placement_r_alpha(read_placement_file(values["placement"]))
    return {k: v for k, v in (("r", r), ("lora_alpha", alpha)) if k not in given}


def _placement_r_alpha(data: dict[str, Any]) -> tuple[int, float]:
    """The r (AdaLoRA: init_r, where it starts) and lora_alpha of a placement file, with PEFT's defaults."""
    adalora = str(data.get("peft_type", "LORA")).upper() == "ADALORA"
    return (data.get("init_r", 12) if adalora else data.get("r", 8)), float(data.get("lora_alpha", 8))


def config_from_flat(values: dict[str, Any], preset: str | None = None) -> ExperimentConfig:
    index = field_index()
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        sections[index[key][0]][key] = value
    cfg = ExperimentConfig(**{name: SECTIONS[name](**vals) for name, vals in sections.items()}, preset=preset)
    return check_environment(cfg)


# Fields renamed since runs were first written: config.json of an older run still loads (old name -> new name).
RENAMED_FIELDS = {"budget_modules": "budget"}


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Rebuild the config a run wrote to `config.json` (fields are checked again; the environment is not: the run
    already did, and a run made elsewhere can still be reported on)."""
    sections = {name: {RENAMED_FIELDS.get(k, k): v for k, v in (data.get(name) or {}).items()} for name in SECTIONS}
    return ExperimentConfig(
        **{name: SECTIONS[name](**sections[name]) for name in SECTIONS}, preset=data.get("preset")
    )


def with_overrides(cfg: ExperimentConfig, overrides: dict[str, Any], source: str = "command line") -> ExperimentConfig:
    """A copy of `cfg` with flat `overrides` (field -> value) applied; values are coerced and every check runs again
    (dataclasses.replace re-runs `__post_init__`). `cfg` itself is not changed."""
    values = normalise_overrides(overrides, source)
    index = field_index()
    changed: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        changed.setdefault(index[name][0], {})[name] = value
    sections = {name: dataclasses.replace(getattr(cfg, name), **changed.get(name, {})) for name in SECTIONS}
    return dataclasses.replace(cfg, **sections)


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    write_json(path, cfg.to_dict())


# ---------------------------------------------------------------------------------------------------------------
# Command-line flags: one per field, generated from the dataclasses


def add_config_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None,
                     help_suffix: str = "") -> None:
    """One flag per config field (same name), defaulting to 'not given' so presets and files can supply it.

    `names` restricts the flags to those fields (e.g. the reanalysable ones of `lorasens analyze`); without it
    `--preset` and `--config` are added too."""
    if names is None:
        parser.add_argument("--preset", default=None, help="Named preset (see `lorasens presets`).")
        parser.add_argument("--config", default=None, help="YAML or JSON config file (preset < file < flags).")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section) if names is None else parser
        for f in fields(cls):
            if names is not None and f.name not in names:
                continue
            typ = field_type(section, f.name)
            base = next((a for a in get_args(typ) if a is not type(None)), typ) if type(None) in get_args(typ) else typ
            kwargs: dict = {"default": argparse.SUPPRESS, "help": f.metadata.get("help", "") + help_suffix}
            if base is bool:
                kwargs.update(nargs="?", const="true", metavar="BOOL")
            elif get_origin(base) is Literal:
                kwargs.update(metavar="{" + ",".join(get_args(base)) + "}")
            group.add_argument(f"--{f.name}", *f.metadata.get("aliases", ()), dest=f.name, **kwargs)


def config_overrides(args: argparse.Namespace) -> dict:
    """The config flags given on the command line (field -> text)."""
    return {name: getattr(args, name) for name in field_index() if hasattr(args, name)}
