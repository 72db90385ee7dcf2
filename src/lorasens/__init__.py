"""lorasens: LoRA module sensitivity analysis on top of PEFT + the Hugging Face Trainer."""

__version__ = "0.1.0"
