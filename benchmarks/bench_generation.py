"""Batched generation vs one-example-at-a-time `generate`: same 64 prompts, same outputs, speed ratio.

SmolLM2-135M, greedy, prompts from the synthetic E2E-style test split (offline). The baseline calls
`model.generate` once per prompt (no padding, through the same function with batch size 1); the batched path is `lorasens.evaluation.generation.generate`
(length-sorted, left-padded batches, KV cache, per-row stop strings). Outputs must be identical; the script fails
otherwise. Target: >= 4x.

Usage: python benchmarks/bench_generation.py [--batch_sizes 16,32] [--max_new_tokens 32] [--num_prompts 64]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_sizes", default="32,16", help="Comma list; 32 is the default --eval_batch_size.")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--num_prompts", type=int, default=64)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's). On a CPU shared with other jobs, 1 thread avoids "
                             "OpenMP threads waiting for a descheduled sibling, which can make small matmuls ~25x slower.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from lorasens.data.registry import group_by_prompt, load_examples, subset
    from lorasens.evaluation.generation import generate
    from lorasens.model.loading import load_model

    loaded = load_model(args.model, "fp32")
    model, tok = loaded.model.to(args.device).eval(), loaded.tokenizer
    prompts = [ex.prompt for ex in subset(group_by_prompt(load_examples("synthetic", "test")), args.num_prompts, 0)]
    common = {"max_new_tokens": args.max_new_tokens, "stop_strings": ("\n",)}
    generate(model, tok, prompts[:2], batch_size=2, **common)  # warm-up (allocator, kernels)

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    # The machine may be shared: single and batched runs are interleaved chunk by chunk, so both see the same load,
    # and CPU time of this process (all threads) is reported beside wall time.
    chunk = max(sizes)
    wall = {"single": 0.0, **{b: 0.0 for b in sizes}}
    cpu = dict.fromkeys(wall, 0.0)
    single: list[str] = []
    batched: dict[int, list[str]] = {b: [] for b in sizes}
    for first in range(0, len(prompts), chunk):
        part = prompts[first : first + chunk]
        for mode in ["single", *sizes]:
            w, c = time.perf_counter(), time.process_time()
            if mode == "single":
                single += [generate(model, tok, [p], batch_size=1, **common)[0] for p in part]
            else:
                batched[mode] += generate(model, tok, part, batch_size=mode, **common)
            wall[mode] += time.perf_counter() - w
            cpu[mode] += time.process_time() - c

    print(f"model {args.model} on {args.device} ({torch.get_num_threads()} threads), {len(prompts)} prompts, "
          f"max_new_tokens {args.max_new_tokens}, greedy")
    print(f"one at a time   : {wall['single']:8.2f} s wall, {cpu['single']:8.2f} s CPU")
    failed = False
    for b in sizes:
        differ = [i for i, (x, y) in enumerate(zip(single, batched[b])) if x != y]
        failed |= bool(differ)
        print(f"batched (b={b:<3d}) : {wall[b]:8.2f} s wall, {cpu[b]:8.2f} s CPU  speed-up {wall['single'] / wall[b]:5.2f}x wall, "
              f"{cpu['single'] / cpu[b]:5.2f}x CPU (target >= 4x), identical outputs {len(prompts) - len(differ)}/{len(prompts)}")
        for i in differ[:3]:
            print(f"  differs at {i}: single={single[i]!r} batched={batched[b][i]!r}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
