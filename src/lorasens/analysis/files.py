"""Names and columns of the files the analysis writes into a run directory (read back by reports and `analyze`)."""

from __future__ import annotations

# The first two names are the ones of the tool lorasens replaces; keep them.
GROUP_NORMS = "gradient_analysis.group_norms.csv"
LAYER_NORMS = "gradient_analysis.layer_norms.csv"
MODULE_NORMS = "gradient_analysis.module_norms.csv"
IMPORTANCE = "importance.csv"
UPDATE_MAGNITUDE = "update_magnitude.csv"
ABLATION = "sensitivity_ablation.csv"
SENSITIVITY = "sensitivity.json"
RECOMMENDED_CONFIG = "recommended_lora_config.json"

GROUP_NORMS_COLUMNS = ("step", "phase", "attn", "mlp", "total")
LAYER_NORMS_COLUMNS = ("step", "phase", "layer", "attn", "mlp")
MODULE_NORMS_COLUMNS = ("step", "phase", "layer", "group", "module", "matrix", "grad_norm")
IMPORTANCE_COLUMNS = ("step", "phase", "layer", "group", "module", "importance")
UPDATE_MAGNITUDE_COLUMNS = ("step", "phase", "layer", "group", "module", "delta_w_norm")
ABLATION_COLUMNS = ("kind", "name", "layer", "group", "module", "num_modules", "loss", "delta_loss")


def module_key(layer: int, module_type: str) -> str:
    """The key of one (layer, module) in sensitivity.json, e.g. "L3.q_proj"."""
    return f"L{layer}.{module_type}"
