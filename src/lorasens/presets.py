"""Named presets: plain data, layered under a config file and CLI flags (preset < file < CLI)."""

from __future__ import annotations

from typing import Any

from lorasens.errors import unknown_choice

# The research setting of the tool we replace: TinyLlama-1.1B, LoRA r=8, 1000 steps, batch 8.
_RESEARCH = {"model": "tinyllama", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "batch_size": 8, "max_steps": 1000,
             "lr": 2e-4, "warmup_steps": 50, "eval_steps": 100, "save_steps": 200, "eval_samples": 200}
_DATASET_SETTINGS = {
    "e2e": {"dataset": "e2e", "max_length": 256},
    "samsum": {"dataset": "samsum", "max_length": 768},
    "wikisql": {"dataset": "wikisql", "max_length": 384},
    "mnli": {"dataset": "mnli", "max_length": 256},
}
_TARGETS = {"attention": "attn", "mlp": "mlp", "both": "both"}
_DESCRIPTIONS = {"attention": "LoRA on attention only", "mlp": "LoRA on the MLP only", "both": "LoRA on attention and MLP"}

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    f"{dataset}_{suffix}": (
        f"TinyLlama-1.1B + {dataset}: {_DESCRIPTIONS[suffix]} (needs the Hub or --data_dir)",
        {**_RESEARCH, **settings, "target": target},
    )
    for dataset, settings in _DATASET_SETTINGS.items()
    for suffix, target in _TARGETS.items()
}
PRESETS["quickstart"] = (
    "SmolLM2-135M on offline synthetic E2E-style data, a static probe (every module trains throughout, the way "
    "the placement method is validated) with the ablation on; a few minutes on a 2-core CPU",
    {
        "model": "smollm2-135m", "dataset": "synthetic", "target": "both", "r": 8, "lora_alpha": 16,
        "batch_size": 4, "max_steps": 30, "lr": 1e-3, "warmup_steps": 0, "max_length": 96, "eval_steps": 10,
        "save_steps": 0, "eval_samples": 16, "train_samples": 600, "eval_batch_size": 16, "max_new_tokens": 40,
        # Static: measures taken under a phase schedule compare modules unfairly (frozen periods differ).
        "ablation_max_single": 8,
        # Each ablated set is one pass over the analysis split: 24 examples keep the 49 passes to seconds on a CPU.
        "analysis_samples": 24,
    },
)


def get_preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise unknown_choice("preset", name, PRESETS)
    return dict(PRESETS[name][1])


def describe_presets() -> list[tuple[str, str]]:
    """Every preset, the one that runs offline here (quickstart) first."""
    return sorted(((name, desc) for name, (desc, _) in PRESETS.items()), key=lambda item: item[0] != "quickstart")
