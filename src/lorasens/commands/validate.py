"""`lorasens validate RUN_DIR`: train fresh adapters on the recommended and on parameter-matched placements, compare."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="Does the recommendation beat placements with the same LoRA parameters? Trains and tests each, per seed.",
        description="Trains the recommendation, parameter-matched random placements, heuristics (q_proj,v_proj; MLP; "
                    "uniform lower rank), all modules and the complement, from scratch with the run's settings, over "
                    "every seed; scores each on a test split disjoint from train and validation. Rerunning the same "
                    "command continues an interrupted validation.",
    )
    p.add_argument("run_dir", help="A finished run (config.json, recommended_lora_config.json, sensitivity.json).")
    p.add_argument("--seeds", default="1,2,3", help="Comma list of training seeds (default 1,2,3).")
    p.add_argument("--max_steps", type=int, default=None, help="Optimizer steps per training (default: the run's).")
    p.add_argument("--budget", type=float, default=None,
                   help="Re-select the recommendation from the run's combined ranking within this LoRA-parameter "
                        "budget: a fraction (< 1) of all modules' parameters or a count (default: the run's "
                        "recommended_lora_config.json as it is).")
    p.add_argument("--random_sets", type=int, default=3, help="Random placements matched in LoRA parameters (default 3).")
    p.add_argument("--metric", default=None,
                   help="Also generate on the test prompts and report this metric of the dataset (e.g. bleu, rouge_l).")
    p.add_argument("--test_samples", type=int, default=200, help="Test prompts (distinct, unseen; default 200).")
    p.add_argument("--out", default=None, help="Output folder (default: RUN_DIR/validation).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing validation of other settings.")
    p.set_defaults(func=run, _subparser=p)


def run(args) -> int:
    # Imported when the command runs, not at start-up (torch, transformers and peft cost seconds; see sweep.py).
    from lorasens.validate import ValidateSettings, parse_seeds, validate_run

    settings = ValidateSettings(seeds=parse_seeds(args.seeds), max_steps=args.max_steps, budget=args.budget,
                                random_sets=args.random_sets, metric=args.metric, test_samples=args.test_samples)
    result = validate_run(args.run_dir, settings, args.out, args.overwrite)
    placements = result.summary["placements"]
    print(f"{'placement':14s} {'LoRA params':>12s} {'test loss':>10s}  95% CI")
    for name, entry in placements.items():
        loss = entry["test_loss"]
        ci = f"[{loss['ci_low']:.4f}, {loss['ci_high']:.4f}]" if loss["ci_low"] is not None else "-"
        print(f"{name:14s} {entry['lora_params']:12d} {loss['mean']:10.4f}  {ci}")
    print(result.summary["verdict"])
    print(f"files: {result.out_dir}")
    return 0
