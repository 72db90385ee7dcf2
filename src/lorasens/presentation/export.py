"""The recommendation in another tool's own config syntax: PEFT (LoraConfig JSON), axolotl and LLaMA-Factory YAML.

Read from the run directory only (recommended_lora_config.json, config.json). The module selection is the
explicit list of module paths lorasens writes; PEFT, axolotl (`lora_target_modules`, a list) and LLaMA-Factory
(`lora_target`, comma-separated names) each hand it to `peft.LoraConfig(target_modules=...)`, which matches an
entry against a module's full name or its dotted suffix.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorasens.analysis.budget import starts_with_eva
from lorasens.errors import UserError, unknown_choice
from lorasens.rundir.files import CONFIG_FILE, RECOMMENDED_CONFIG
from lorasens.safeio import dumps, read_json

FORMATS = {"peft": "lora_config.peft.json", "axolotl": "lora.axolotl.yaml", "llamafactory": "lora.llamafactory.yaml"}
# lorasens aliases and the Hub id a config file for another tool needs (a random test model has none).
HUB_IDS = {"tinyllama": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
           "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def _yaml_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid YAML double-quoted scalar


def to_yaml(data: dict, comment: str) -> str:
    """Flat mapping of scalars and lists of scalars; strings double-quoted, so no value is read as another type."""
    lines = [f"# {line}" for line in comment.splitlines()]
    for key, value in data.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"  - {_yaml_value(v)}" for v in value]
        else:
            lines.append(f"{key}: {_yaml_value(value)}")
    return "\n".join(lines) + "\n"


def load_recommendation(run_dir: Path) -> tuple[dict, str]:
    lora = read_json(run_dir / RECOMMENDED_CONFIG, tolerant=True)
    if not isinstance(lora, dict) or "target_modules" not in lora:
        raise UserError(f"{run_dir / RECOMMENDED_CONFIG} is missing or unreadable; run the analysis first "
                        f"(`lorasens analyze {run_dir}`)")
    config = read_json(run_dir / CONFIG_FILE, tolerant=True) or {}
    model = (config.get("model") or {}).get("model") or "BASE_MODEL"
    return lora, HUB_IDS.get(model, model)


def export(run_dir: str | Path, fmt: str, output: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise unknown_choice("format", fmt, FORMATS)
    lora, base_model = load_recommendation(run_dir)
    targets = lora["target_modules"]
    if fmt != "peft" and isinstance(targets, str):
        raise UserError(f"{RECOMMENDED_CONFIG} selects its modules with one regular expression (too many to list); "
                        f"{fmt} takes module names only: use --format peft")
    if fmt != "peft" and lora.get("rank_pattern"):
        raise UserError(f"{RECOMMENDED_CONFIG} gives each module its own rank (rank_pattern), which {fmt}'s config "
                        "has no key for: use --format peft (a LoraConfig for your script), or "
                        f"`lorasens analyze {run_dir} --allocate modules` for one rank on the top modules")
    if fmt != "peft" and starts_with_eva(lora):
        raise UserError(f"{RECOMMENDED_CONFIG} starts LoRA with EVA (init_lora_weights eva), which needs a pass over "
                        f"training batches that {fmt} does not run: use --format peft with lorasens.initialize_eva in "
                        f"your script, or `lorasens analyze {run_dir} --recommend_init default`")
    path = Path(output) if output else run_dir / FORMATS[fmt]
    comment = f"LoRA placement recommended by lorasens for {run_dir.name} ({len(targets)} modules)."
    if fmt == "peft":
        text = dumps(lora, indent=2) + "\n"
    elif fmt == "axolotl":
        text = to_yaml({"base_model": base_model, "adapter": "lora", "lora_r": lora["r"],
                        "lora_alpha": lora["lora_alpha"], "lora_dropout": lora["lora_dropout"],
                        "lora_target_modules": list(targets)},
                       comment + "\nMerge these keys into your axolotl config.")
    else:
        text = to_yaml({"model_name_or_path": base_model, "stage": "sft", "finetuning_type": "lora",
                        "lora_rank": lora["r"], "lora_alpha": int(round(lora["lora_alpha"])),
                        "lora_dropout": lora["lora_dropout"], "lora_target": ",".join(targets)},
                       comment + "\nMerge these keys into your LLaMA-Factory training YAML.")
    path.write_text(text, encoding="utf-8")
    return path
