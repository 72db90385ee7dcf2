"""Ablation cost: the cached engine (layer replay with shared prefixes, padding-free rows) vs whole-decoder passes.

LoRA r=8 on all 7 projections of every layer, B drawn at random as if trained, the quickstart's kinds of sets (all
on/off, 2 groups, every layer, 7 module types) plus `--singles` single-module ablations, on validation examples of
the real E2E data (`../shared/data/e2e`, or --data_dir) or the offline synthetic E2E-style data. Arms, alternated
round by round in one process so that they see the same machine load:

- `before`: every set through the whole decoder + LM head at the target positions, padded batches
  (`method="decoder"`, what lorasens did before the cached engine);
- `decoder`: the same whole passes over the engine's padding-free batches (isolates the caching);
- `replay`: the cached engine as it was: per set, layers L..N-1 from the cached input of its first layer L;
- `branch`: sets that switch off the same modules in layers 0..L share those layers, LoRA through PEFT's branch;
- `shared`: what `lorasens train` runs (`run_ablation`, method auto): `branch` with each replayed layer's LoRA folded
  into its weights.

Reports CPU time (one thread, so other jobs on the machine inflate it less than wall time), wall time, ratios
against `before` and `decoder`, the layer runs each arm needs, and the largest difference between the arms'
delta_loss values (target: <= 1e-5). Target: shared <= 0.5x of the uncached passes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ablation.py [--model tiny-random-llama] [--examples 16]
        [--singles 8] [--rounds 2] [--dataset e2e|synthetic]
"""

from __future__ import annotations

import argparse
import sys
import os
import time
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/common.py
from common import lora_model_with_features  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 96  # the quickstart's


def per_set_replay(model, lora, batches, singles, layers_path, num_examples):
    """The cached engine before prefix sharing: one replay of layers L..N-1 per set."""
    from lorasens.analysis.ablation import (
        LayerCache, _cached_pass, _example_sums, _scored, ablation_sets, lora_switched_off)

    sets = ablation_sets(lora, singles)
    base = model.get_base_model()
    layers = base.get_submodule(layers_path)
    sums = torch.zeros((len(sets), num_examples), dtype=torch.float64)
    counts = torch.zeros(num_examples, dtype=torch.long)
    with torch.no_grad():
        for batch in batches:
            _, _, example = _scored(batch)
            cache = LayerCache(layers)
            cache.capture(lambda: base.get_decoder()(**batch.inputs, use_cache=False))
            for index, s in enumerate(sets):
                with lora_switched_off(model, s.modules):
                    nll = _cached_pass(base, cache, s.first_layer if s.modules else len(layers), batch)
                batch_sums, batch_counts = _example_sums(nll, example, num_examples)
                sums[index] += batch_sums
                if index == 0:
                    counts += batch_counts
    losses = sums.sum(dim=1) / counts.sum()
    return (losses - losses[0]).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="e2e", choices=("e2e", "synthetic"))
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "e2e"))
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--singles", type=int, default=8, help="single-module ablations (the quickstart has 8)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=MAX_LENGTH, help="96: the quickstart's (SmolLM2 tokens); "
                        "the tiny model's byte-level tokens need ~256 for E2E")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lorasens.analysis.ablation import (
        ablation_max_tokens, ablation_sets, count_layer_runs, layer_plan, run_ablation, validation_batches)
    from lorasens.data.features import build_features
    from lorasens.data.registry import load_examples
    from lorasens.model.lora import apply_lora, lora_parameters
    from lorasens.model.loading import load_model
    from lorasens.model.module_map import build_module_map

    loaded = load_model(args.model, "fp32")
    tokenizer = loaded.tokenizer
    model, module_map, lora, features, pad = lora_model_with_features(loaded, args)
    model.eval()
    singles = [lp.module for lp in lora[:: max(1, len(lora) // max(1, args.singles))][: args.singles]]
    padded = validation_batches(features, 16, pad, "cpu")
    packed = validation_batches(features, None, pad, "cpu", packing=True,
                                max_tokens=ablation_max_tokens(model, module_map.num_layers))
    lengths = [len(f["input_ids"]) for f in features]
    sets = ablation_sets(lora, singles)
    n = module_map.num_layers
    runs_needed = {"before": n * len(sets), "decoder": n * len(sets),
                   "replay": n + sum(n - s.first_layer for s in sets if s.modules),
                   "branch": n + count_layer_runs(layer_plan(sets, n)),
                   "shared": n + count_layer_runs(layer_plan(sets, n))}
    print(f"{args.model}, {args.dataset}: {len(features)} examples, {sum(lengths)} tokens; padded: "
          f"{sum(b.num_tokens for b in padded)} positions in {len(padded)} batch(es); packed: "
          f"{sum(b.num_tokens for b in packed)} positions in {sum(b.labels.shape[0] for b in packed)} row(s); "
          f"{len(sets)} sets, {n} layers; threads {args.threads}; load {os.getloadavg()[0]:.2f}")
    print("layer runs per batch: " + ", ".join(f"{k} {v}" for k, v in runs_needed.items()))

    def arm(name):
        common = dict(layers_path=module_map.layers_path, num_examples=len(features))
        if name == "before":
            return [r.delta_loss for r in run_ablation(model, lora, padded, singles, method="decoder", **common).rows()]
        if name == "decoder":
            return [r.delta_loss for r in run_ablation(model, lora, packed, singles, method="decoder", **common).rows()]
        if name == "replay":
            return per_set_replay(model, lora, packed, singles, **common)
        result = run_ablation(model, lora, packed, singles, fold=name == "shared", **common)
        assert result.method == "cached", result.method_reason
        return [r.delta_loss for r in result.rows()]

    names = ("before", "decoder", "replay", "branch", "shared")
    cpu = dict.fromkeys(names, 0.0)
    wall = dict.fromkeys(names, 0.0)
    deltas = {}
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else reversed(names):
            c, w = time.process_time(), time.perf_counter()
            deltas[name] = torch.tensor(arm(name), dtype=torch.float64)
            cpu[name] += time.process_time() - c
            wall[name] += time.perf_counter() - w
    print(f"load after: {os.getloadavg()[0]:.2f}")
    for name in names:
        diff = float((deltas[name] - deltas["before"]).abs().max())
        print(f"{name:>8}: CPU {cpu[name]:7.1f} s, wall {wall[name]:7.1f} s; CPU / before {cpu[name] / cpu['before']:.3f}x, "
              f"/ decoder {cpu[name] / cpu['decoder']:.3f}x; wall / before {wall[name] / wall['before']:.3f}x; "
              f"max |delta difference| vs before {diff:.1e}")
    print(f"largest |delta| {float(deltas['before'].abs().max()):.4f}; target: shared <= 0.5x of the uncached passes")


if __name__ == "__main__":
    main()
