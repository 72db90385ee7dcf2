"""Experiment configuration: nested, typed dataclasses with a help text per field.

Every field is also a CLI flag of the same name (`--r`, `--lora_alpha`, ...), so the flag names are defined once,
here. Values are resolved in this order: defaults < preset < config file (YAML/JSON) < CLI flags. Unknown keys are
errors that list the valid ones. `ExperimentConfig.validate()` raises `UserError` with an actionable message.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from lorasens.errors import UserError, unknown_choice

Target = Literal["attn", "mlp", "both"]
TARGET_ALIASES = {"attention": "attn"}
LrScheduler = Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"]
ReportTo = Literal["none", "tensorboard", "wandb", "mlflow"]
Precision = Literal["auto", "fp32", "bf16"]
BudgetUnit = Literal["modules", "params"]


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help text (shown by `--help` and in docs/GUIDE.md)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class ModelConfig:
    model: str = opt(
        "tinyllama",
        "Causal LM: an alias (tinyllama, smollm2-135m, tiny-random-llama), a Hugging Face Hub id, or a local path.",
    )
    attn_modules: str | None = opt(
        None, "Comma list of attention linear-module names, for architectures the module map does not know."
    )
    mlp_modules: str | None = opt(None, "Comma list of MLP linear-module names, for unknown architectures.")
    precision: Precision = opt("auto", "auto = bf16 on a CUDA GPU that supports it, else fp32.")


@dataclass
class LoraSettings:
    target: Target = opt("both", "Module groups that get LoRA: attn, mlp or both (attention = attn).")
    r: int = opt(8, "LoRA rank.")
    lora_alpha: float = opt(16.0, "LoRA alpha; the update is scaled by lora_alpha / r.")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input, in [0, 1).")


@dataclass
class DataConfig:
    dataset: str = opt("e2e", "Dataset name (see `lorasens datasets`).")
    data_dir: str | None = opt(None, "Local folder with the dataset's official files; default: the Hugging Face Hub.")
    max_length: int = opt(256, "Maximum tokens per training example (prompt + target); prompts are cut first.")
    train_samples: int | None = opt(None, "Use a deterministic subset of this many training examples.")
    eval_samples: int = opt(200, "Held-out examples for validation loss and final evaluation.")
    prompt_template: str | None = opt(
        None, "Prompt override, a format string over the dataset's fields, e.g. 'Dialogue: {dialogue}\\nSummary:' "
        "(see docs/GUIDE.md); default: the dataset's own template."
    )


@dataclass
class TrainingConfig:
    batch_size: int = opt(8, "Per-device training batch size.")
    grad_accum: int = opt(1, "Gradient accumulation steps.")
    max_steps: int = opt(1000, "Optimizer steps to train.")
    lr: float = opt(2e-4, "Peak learning rate (AdamW).")
    lr_scheduler: LrScheduler = opt("linear", "Learning-rate schedule (transformers names).")
    warmup_steps: int = opt(0, "Linear warm-up steps.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm; 0 disables clipping.")
    seed: int = opt(42, "Random seed (model init, data order, dropout).")
    eval_steps: int = opt(100, "Validation loss every N steps; 0 = never.")
    save_steps: int = opt(0, "Trainer checkpoint every N steps (needed for --resume); 0 = never.")
    logging_steps: int = opt(1, "Log loss/lr/grad_norm to train_log.jsonl every N steps.")
    gradient_checkpointing: bool = opt(False, "Non-reentrant activation checkpointing (less memory, more compute).")
    report_to: ReportTo = opt("none", "Also report to this tracker (passed to the Trainer).")


@dataclass
class ScheduleConfig:
    dynamic_lora: bool = opt(False, "Switch LoRA modules on and off in phases (needs --phase_strategy).")
    phase_strategy: str | None = opt(
        None, "Phase schedule, e.g. both->mlp->attn, early->late, attn@0-10->mlp@11-21, lisa:layers=2,interval=50."
    )
    phase1_end: int | None = opt(None, "Step at which phase 1 ends.")
    phase2_end: int | None = opt(None, "Step at which phase 2 ends.")
    phase_ends: str | None = opt(None, "Comma list of phase end steps (300,600) or fractions of max_steps (0.2,0.4).")
    reset_optimizer_on_switch: bool = opt(
        False, "Reset AdamW state of modules that become trainable again (default: keep it)."
    )


@dataclass
class TrackingConfig:
    track_gradients: bool = opt(True, "Record per-module LoRA gradient norms.")
    grad_log_interval: int = opt(1, "Record gradient norms every N optimizer steps.")
    track_importance: bool = opt(True, "Record first-order Taylor importance |theta * grad| (EMA-smoothed).")
    track_update_magnitude: bool = opt(True, "Record ||delta W||_F = scaling * ||B A||_F per module.")
    importance_ema: float = opt(0.85, "EMA factor for importance smoothing (as AdaLoRA's beta1).")
    ablation: bool = opt(True, "Run the ablation study after training.")
    ablation_max_single: int = opt(64, "At most this many single (layer, module) ablations.")
    budget_modules: float | None = opt(
        None, "Recommendation budget: K modules (>= 1) or a fraction of all modules (< 1). Default: half."
    )
    budget_unit: BudgetUnit = opt(
        "modules", "What --budget_modules counts: modules, or LoRA parameters (a count >= 1 or a fraction < 1)."
    )


@dataclass
class EvaluationConfig:
    evaluate: bool = opt(True, "Generate on the held-out split and score it at the end of training.")
    eval_batch_size: int = opt(16, "Batch size for generation.")
    max_new_tokens: int | None = opt(None, "Generation length; default: the dataset's own.")
    num_beams: int = opt(1, "Beam search width (1 = greedy).")
    baseline: bool = opt(False, "Also score the base model without LoRA.")


@dataclass
class OutputConfig:
    output_dir: str = opt("runs", "Folder that holds run directories.")
    experiment_name: str | None = opt(None, "Run directory name; default: derived from preset/dataset/target.")
    overwrite: bool = opt(False, "Replace an existing run directory of the same name.")
    resume: bool = opt(False, "Continue the run in the run directory from its latest checkpoint.")


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

    def validate(self) -> ExperimentConfig:
        """Check values a user can get wrong; raise `UserError` naming the field and the valid range."""
        lora, tr, data, sched = self.lora, self.training, self.data, self.schedule
        _positive("r", lora.r)
        _positive("lr", tr.lr)
        _positive("max_steps", tr.max_steps)
        _positive("batch_size", tr.batch_size)
        _positive("grad_accum", tr.grad_accum)
        _positive("max_length", data.max_length)
        _positive("eval_samples", data.eval_samples)
        _positive("logging_steps", tr.logging_steps)
        _positive("grad_log_interval", self.tracking.grad_log_interval)
        _positive("eval_batch_size", self.evaluation.eval_batch_size)
        _positive("num_beams", self.evaluation.num_beams)
        if lora.lora_alpha <= 0:
            raise UserError(f"--lora_alpha must be > 0, got {lora.lora_alpha}")
        if not 0 <= lora.lora_dropout < 1:
            raise UserError(f"--lora_dropout must be in [0, 1), got {lora.lora_dropout}")
        for name in ("warmup_steps", "eval_steps", "save_steps"):
            if getattr(tr, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(tr, name)}")
        if tr.weight_decay < 0 or tr.max_grad_norm < 0:
            raise UserError("--weight_decay and --max_grad_norm must be >= 0")
        if data.train_samples is not None and data.train_samples <= 0:
            raise UserError(f"--train_samples must be > 0, got {data.train_samples}")
        if not 0 < self.tracking.importance_ema < 1:
            raise UserError(f"--importance_ema must be in (0, 1), got {self.tracking.importance_ema}")
        if self.tracking.budget_modules is not None and self.tracking.budget_modules <= 0:
            raise UserError(f"--budget_modules must be > 0 (a count >= 1 or a fraction < 1), got {self.tracking.budget_modules}")
        budget = self.tracking.budget_modules
        if budget is not None and budget > 1 and not float(budget).is_integer():
            raise UserError(f"--budget_modules must be a whole count (>= 1) or a fraction (< 1), got {budget}")
        if self.tracking.ablation_max_single < 0:
            raise UserError(f"--ablation_max_single must be >= 0, got {self.tracking.ablation_max_single}")
        if sched.dynamic_lora and not sched.phase_strategy:
            raise UserError("--dynamic_lora needs --phase_strategy (e.g. both->mlp->attn); see `lorasens strategies`")
        # A strategy means a dynamic run: record it so config.json says so (and --resume compares equal).
        sched.dynamic_lora = bool(sched.phase_strategy)
        if not sched.phase_strategy:
            given = [f"--{n}" for n in ("phase_ends", "phase1_end", "phase2_end") if getattr(sched, n) is not None]
            given += ["--reset_optimizer_on_switch"] if sched.reset_optimizer_on_switch else []
            if given:
                raise UserError(f"{', '.join(given)} only apply to a phase schedule; add --phase_strategy (e.g. both->mlp->attn)")
        if self.output.overwrite and self.output.resume:
            raise UserError("--overwrite and --resume exclude each other: one replaces the run, the other continues it")
        from lorasens.data.registry import get_dataset_spec
        from lorasens.models import check_model_name

        get_dataset_spec(data.dataset)
        check_model_name(self.model.model)
        if tr.report_to != "none":
            import importlib.util

            if importlib.util.find_spec(tr.report_to) is None:
                raise UserError(f"--report_to {tr.report_to} needs the {tr.report_to} package (pip install {tr.report_to}); valid without extra packages: none, tensorboard")
        if sched.phase_strategy:
            # Parsed without a model here (layer counts are checked again once the model is loaded).
            from lorasens.schedule import parse_schedule_from_config

            parse_schedule_from_config(self)
        return self


def _positive(name: str, value: float) -> None:
    if value is None or value <= 0:
        raise UserError(f"--{name} must be > 0, got {value}")


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
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str) and not value.lstrip("-").isdigit():
                raise ValueError
            return int(value)
        if base is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be of type {getattr(base, '__name__', base)}, got {value!r}") from None


def normalise_overrides(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Accept both nested ({training: {lr: ..}}) and flat ({lr: ..}) dictionaries; return flat, coerced values."""
    index = field_index()
    flat: dict[str, Any] = {}
    for key, value in raw.items():
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
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        raise UserError(f"config file {str(path)!r} is not valid: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping of settings")
    return data


def build_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    cli_overrides: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Resolve defaults < preset < file < CLI into a validated `ExperimentConfig`."""
    from lorasens.presets import get_preset

    layers: list[dict[str, Any]] = []
    file_data = load_config_file(config_file) if config_file else {}
    if preset is None and isinstance(file_data.get("preset"), str):
        preset = file_data["preset"]
    if preset is not None:
        layers.append(normalise_overrides(get_preset(preset), f"preset {preset!r}"))
    if file_data:
        layers.append(normalise_overrides(file_data, f"config file {str(config_file)!r}"))
    if cli_overrides:
        layers.append(normalise_overrides(cli_overrides, "command line"))
    return config_from_flat({k: v for layer in layers for k, v in layer.items()}, preset=preset)


def config_from_flat(values: dict[str, Any], preset: str | None = None) -> ExperimentConfig:
    index = field_index()
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        sections[index[key][0]][key] = value
    cfg = ExperimentConfig(**{name: SECTIONS[name](**vals) for name, vals in sections.items()}, preset=preset)
    return cfg.validate()


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Rebuild the config a run wrote to `config.json` (no validation of the environment: the run already did)."""
    return ExperimentConfig(
        **{name: SECTIONS[name](**data.get(name, {})) for name in SECTIONS}, preset=data.get("preset")
    )


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
