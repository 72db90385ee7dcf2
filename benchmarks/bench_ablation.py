"""Ablation cost: cached layer replay (+ padding-free rows) vs whole-decoder passes over padded batches, same deltas.

The quickstart's set of ablations (SmolLM2-135M, LoRA r=8 on all 7 projections of all 30 layers, 16 validation
examples of the synthetic E2E-style data, 41 sets: all on/off, 2 groups, 30 layers, 7 module types) with LoRA B
drawn at random as if trained. Three engines on the same model and examples, one after the other in one process:

- `before`: every set through the whole decoder + LM head at the target positions, one padded batch of 16
  (what lorasens did before the cached engine: `method="decoder"`, `--eval_batch_size` 16);
- `cached`: the cached engine on the same padded batch (layers L..N only);
- `cached+packed`: what `lorasens train` runs now: cached, padding-free rows, batches sized from free memory.

Reports CPU time (one thread, so other jobs on the machine inflate it less than wall time) and wall time, ratios
against `before`, and the largest difference between the engines' delta_loss values (target: <= 1e-6).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ablation.py [--examples 16] [--singles 0]
"""

from __future__ import annotations

import argparse
import time

import torch

MAX_LENGTH = 96  # the quickstart's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--singles", type=int, default=0, help="single-module ablations (the quickstart has 0)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from lorasens.analysis.ablation import ablation_max_tokens, run_ablation, validation_batches
    from lorasens.data.features import build_features
    from lorasens.data.registry import load_examples
    from lorasens.lora import apply_lora, lora_parameters
    from lorasens.models import load_model
    from lorasens.module_map import build_module_map

    loaded = load_model("smollm2-135m", "fp32")
    tokenizer = loaded.tokenizer
    module_map = build_module_map(loaded.model)
    torch.manual_seed(0)
    model = apply_lora(loaded.model, module_map.modules, 8, 16.0, 0.0).eval()
    lora = lora_parameters(model, module_map)
    with torch.no_grad():
        for lp in lora:
            lp.B.normal_(0, 0.02)
    examples = load_examples("synthetic", "validation", None, seed=42, limit=args.examples)
    features = build_features(examples, tokenizer, MAX_LENGTH, "validation")[0]
    pad = tokenizer.pad_token_id
    singles = [lp.module for lp in lora[: args.singles]]
    padded = validation_batches(features, 16, pad, "cpu")
    packed = validation_batches(features, None, pad, "cpu", packing=True,
                                max_tokens=ablation_max_tokens(model, module_map.num_layers))
    lengths = [len(f["input_ids"]) for f in features]
    print(f"{len(features)} examples, {sum(lengths)} tokens; padded: {sum(b.num_tokens for b in padded)} "
          f"positions in {len(padded)} batch(es); packed: {sum(b.num_tokens for b in packed)} positions in "
          f"{sum(b.labels.shape[0] for b in packed)} row(s), {len(packed)} batch(es)")

    runs = {}
    for name, batches, method in (("before", padded, "decoder"), ("cached", padded, "auto"),
                                  ("cached+packed", packed, "auto")):
        cpu, wall = time.process_time(), time.perf_counter()
        result = run_ablation(model, lora, batches, singles, method=method, layers_path=module_map.layers_path,
                              num_examples=len(features))
        runs[name] = (time.process_time() - cpu, time.perf_counter() - wall, result)
        print(f"{name:>14}: {len(result.sets)} sets, method {result.method}: CPU {runs[name][0]:.1f} s, "
              f"wall {runs[name][1]:.1f} s", flush=True)

    base_cpu, base_wall, base = runs["before"]
    base_deltas = torch.tensor([r.delta_loss for r in base.rows()], dtype=torch.float64)
    print(f"delta_loss of the sets (before): largest |delta| {float(base_deltas.abs().max()):.4f}, "
          f"smallest nonzero {float(base_deltas[base_deltas != 0].abs().min()):.2e}")
    for name in ("cached", "cached+packed"):
        cpu, wall, result = runs[name]
        deltas = torch.tensor([r.delta_loss for r in result.rows()], dtype=torch.float64)
        print(f"{name:>14} / before: CPU {cpu / base_cpu:.3f}x, wall {wall / base_wall:.3f}x; "
              f"max |delta_loss difference| {float((deltas - base_deltas).abs().max()):.2e}")


if __name__ == "__main__":
    main()
