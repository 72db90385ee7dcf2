"""lorasens: LoRA module sensitivity analysis on top of PEFT + the Hugging Face Trainer.

In your own training script (any Trainer, TRL's SFTTrainer included):

    from lorasens import SensitivityCallback, PhaseScheduleCallback
    from lorasens import initialize_eva   # a recommendation with init_lora_weights "eva" (--recommend_init eva)
"""

import importlib
import logging

# bitsandbytes (imported by PEFT and transformers whenever it is installed, as it is for --quantize) warns on import
# that an optional faster CPU kernel package is missing; its own CPU path works without it, so every command
# would start with a line the user can do nothing about.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

# Resolved on first use (PEP 562): `import lorasens` also runs for `lorasens --help`, which must not pay for
# importing torch and transformers (seconds); the callbacks need both.
_LAZY = {
    "SensitivityCallback": "lorasens.experiment.script_callback",
    "PhaseScheduleCallback": "lorasens.training.phases",
    "initialize_eva": "lorasens.training.peft_methods",
}

__all__ = ["SensitivityCallback", "PhaseScheduleCallback", "initialize_eva", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorasens' has no attribute {name!r}")
