"""Shared helpers for the benchmarks: a step timer callback and robust summaries."""

from __future__ import annotations

import statistics
import time

from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Wall time between consecutive step starts (so logging and callback work after a step is included)."""

    def __init__(self):
        self.starts: list[float] = []
        self.end: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.starts.append(time.perf_counter())

    def on_train_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()

    def step_times(self, skip: int = 2) -> list[float]:
        marks = self.starts + [self.end]
        return [b - a for a, b in zip(marks[:-1], marks[1:])][skip:]


def median(values: list[float]) -> float:
    return statistics.median(values)


def lora_model_with_features(loaded, args):
    """The model with LoRA on every module and small random B (a trained-looking adapter), and the dataset's
    validation features: the setup the ablation and first-order benchmarks share. Returns
    (model, module_map, lora, features, pad_token_id)."""
    import torch

    from lorasens.data.features import build_features
    from lorasens.data.registry import load_examples
    from lorasens.model.lora import apply_lora, lora_parameters
    from lorasens.model.module_map import build_module_map

    module_map = build_module_map(loaded.model)
    torch.manual_seed(0)
    model = apply_lora(loaded.model, module_map.modules, 8, 16.0, 0.0)
    lora = lora_parameters(model, module_map)
    with torch.no_grad():
        for lp in lora:
            lp.B.normal_(0, 0.02)
    data_dir = args.data_dir if args.dataset == "e2e" else None
    examples = load_examples(args.dataset, "validation", data_dir, seed=42, limit=args.examples)
    features = build_features(examples, loaded.tokenizer, args.max_length, "validation")[0]
    tokenizer = loaded.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model, module_map, lora, features, pad
