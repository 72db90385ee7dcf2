"""First-order estimate cost: LM head at the labelled positions only vs at every position, and vs a training step.

SmolLM2-135M, LoRA r=8 on all 7 projections (B drawn at random as if trained), `--examples` validation examples of
the real E2E data (`../shared/data/e2e`) or the synthetic E2E-style data, in the padded batches `lorasens` uses for
the estimate. Arms, alternated round by round in one process:

- `labelled`: `first_order_estimates` as `lorasens train` runs it (decoder, then the head at the labelled positions);
- `full head`: the same with the plain forward (the head at every position: what it did before);
- `train step`: one forward + backward of a training batch of `--batch_size` of the same examples (the model in
  train mode, loss over the labels), what a training step costs without the optimizer.

Prints CPU and wall time per arm, `labelled / full head`, the estimate's cost in training steps (the figure
`summary.json` records as `first_order_train_steps`, there against the median logged step), and the largest
difference between the two estimates (target: equal to 1e-5 relative).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_first_order.py [--examples 24] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import os
import time
from pathlib import Path
from unittest import mock

import torch
sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/common.py
from common import lora_model_with_features  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="e2e", choices=("e2e", "synthetic"))
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "e2e"))
    parser.add_argument("--examples", type=int, default=24, help="the quickstart's analysis split holds 24")
    parser.add_argument("--batch_size", type=int, default=4, help="the quickstart's training batch")
    parser.add_argument("--max_length", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lorasens.analysis import first_order
    from lorasens.analysis.ablation import validation_batches
    from lorasens.data.features import build_features
    from lorasens.data.registry import load_examples
    from lorasens.model.lora import apply_lora, lora_parameters
    from lorasens.model.loading import load_model
    from lorasens.model.module_map import build_module_map
    from lorasens.training.trainer import padded_collator

    loaded = load_model(args.model, "fp32")
    tokenizer = loaded.tokenizer
    model, module_map, lora, features, pad = lora_model_with_features(loaded, args)
    batches = validation_batches(features, None, pad, "cpu", max_tokens=4096)
    train_batch = padded_collator(tokenizer)([{"input_ids": f["input_ids"], "labels": f["labels"]}
                                              for f in features[: args.batch_size]])
    scored = sum(int((b.labels[:, 1:] != -100).sum()) for b in batches)
    positions = sum(b.num_tokens for b in batches)
    print(f"{args.model}, {args.dataset}: {len(features)} examples, {positions} positions, {scored} labelled; "
          f"threads {args.threads}; load {os.getloadavg()[0]:.2f}")

    def train_step():
        model.train()
        loss = model(**train_batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return None

    def arm(name):
        if name == "labelled":
            return first_order.first_order_estimates(model, lora, batches)
        if name == "full head":
            with mock.patch.object(first_order, "_final_norm", lambda base: None):
                return first_order.first_order_estimates(model, lora, batches)
        return train_step()

    names = ("labelled", "full head", "train step")
    cpu = dict.fromkeys(names, 0.0)
    wall = dict.fromkeys(names, 0.0)
    out = {}
    train_step()  # warm-up
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else reversed(names):
            c, w = time.process_time(), time.perf_counter()
            out[name] = arm(name)
            cpu[name] += time.process_time() - c
            wall[name] += time.perf_counter() - w
    print(f"load after: {os.getloadavg()[0]:.2f}")
    for name in names:
        print(f"{name:>10}: CPU {cpu[name] / args.rounds:6.2f} s, wall {wall[name] / args.rounds:6.2f} s per run")
    fast, full = torch.tensor(out["labelled"]), torch.tensor(out["full head"])
    print(f"labelled / full head: CPU {cpu['labelled'] / cpu['full head']:.3f}x, wall "
          f"{wall['labelled'] / wall['full head']:.3f}x; estimate in training steps (batch {args.batch_size}): CPU "
          f"{cpu['labelled'] / cpu['train step']:.2f}, wall {wall['labelled'] / wall['train step']:.2f} "
          f"(full head: {cpu['full head'] / cpu['train step']:.2f}); max relative difference "
          f"{float(((fast - full).abs() / full.abs().max()).max()):.1e}")


if __name__ == "__main__":
    main()
