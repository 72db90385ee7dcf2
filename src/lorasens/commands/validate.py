"""`lorasens validate RUN_DIR`: the recommendation against PEFT's allocators and controls at equal LoRA parameters."""

from __future__ import annotations

# Spelled out here (the arms' table imports torch, which `lorasens --help` should not wait for); a test keeps the two
# lists equal.
ARM_HELP = ("recommended, ranks, ranks_floor, spread, types, value, eva_init, ranks_eva_init (lorasens); eva, "
            "adalora, gora, kappa (peers); qv, uniform, mlp, random, random_typed, ranks_shuffled (controls); "
            "all (ceiling)")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="Does the recommendation beat PEFT's EVA/AdaLoRA and other placements at equal LoRA parameters?",
        description="Trains every arm from scratch with the run's model and data at the recommendation's LoRA "
                    "parameters (±5%), each at the learning rate of --lr_grid with the lowest validation loss, over "
                    "the seeds; scores each on test prompts no training, validation or analysis row holds; compares "
                    "with a bootstrap over seeds and prompts and Holm's correction. Rerunning the same command "
                    "continues an interrupted validation.",
        allow_abbrev=False,
    )
    p.add_argument("run_dir", help="A finished run (config.json, recommended_lora_config.json, sensitivity.json).")
    p.add_argument("--arms", default=None, help=f"Comma list of arms (default: every arm that applies): {ARM_HELP}.")
    p.add_argument("--seeds", default="1,2,3", help="Comma list of training seeds (default 1,2,3).")
    p.add_argument("--extra_seeds", default=None,
                   help="More seeds for some arms, as SEEDS:ARMS, e.g. 4,5:recommended,eva,adalora,qv,random.")
    p.add_argument("--max_steps", type=int, default=None, help="Optimizer steps per training (default: the run's).")
    p.add_argument("--sweep_steps", type=int, default=None,
                   help="Steps of each learning-rate sweep training (default: half of --max_steps).")
    p.add_argument("--lr_grid", default="3e-4,1e-3,3e-3",
                   help="Learning rates tried per arm on the first seed; the lowest validation loss wins (default "
                        "3e-4,1e-3,3e-3).")
    p.add_argument("--budget", type=float, default=None,
                   help="Re-select the recommendation from the run's combined ranking within this LoRA-parameter "
                        "budget: a fraction (< 1) of all modules' parameters or a count (default: the run's "
                        "recommended_lora_config.json as it is).")
    p.add_argument("--random_sets", type=int, default=6, help="Random placements matched in LoRA parameters (default 6).")
    p.add_argument("--test_samples", type=int, default=None, help="Test prompts (default: every unseen test prompt).")
    p.add_argument("--generate", default="true", choices=("true", "false"),
                   help="Also generate on the test prompts and score the dataset's metrics (default true).")
    p.add_argument("--out", default=None, help="Output folder (default: RUN_DIR/validation).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing validation of other settings.")
    p.set_defaults(func=run, _subparser=p)


def _floats(text: str, flag: str) -> tuple[float, ...]:
    from lorasens.errors import UserError

    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{flag} needs a comma list of numbers, e.g. 3e-4,1e-3,3e-3; got {text!r}") from None
    return values


def run(args) -> int:
    # Imported when the command runs, not at start-up (torch, transformers and peft cost seconds).
    from lorasens.errors import UserError
    from lorasens.experiment.validation.driver import ValidateSettings, parse_seeds, validate_run

    extra_seeds, extra_arms = (), ()
    if args.extra_seeds:
        if ":" not in args.extra_seeds:
            raise UserError(f"--extra_seeds needs SEEDS:ARMS, e.g. 4,5:recommended,eva; got {args.extra_seeds!r}")
        seeds_text, arms_text = args.extra_seeds.split(":", 1)
        extra_seeds = parse_seeds(seeds_text, "--extra_seeds")
        extra_arms = tuple(a.strip() for a in arms_text.split(",") if a.strip())
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip()) if args.arms else None
    settings = ValidateSettings(seeds=parse_seeds(args.seeds), extra_seeds=extra_seeds, extra_seed_arms=extra_arms,
                                arms=arms, random_sets=args.random_sets, max_steps=args.max_steps,
                                sweep_steps=args.sweep_steps, lr_grid=_floats(args.lr_grid, "--lr_grid"),
                                budget=args.budget, test_samples=args.test_samples, generate=args.generate == "true")
    result = validate_run(args.run_dir, settings, args.out, args.overwrite)
    print(f"{'arm':16s} {'family':9s} {'LoRA params':>12s} {'lr':>8s} {'units':>5s} {'val loss':>9s} {'test loss':>9s}")
    for name, e in result.summary["arms"].items():
        if e.get("test_loss") is None:
            continue
        print(f"{name:16s} {e['family']:9s} {e['lora_params']:12,d} {e['lr']:8g} {e['units']:5d} "
              f"{e['validation_loss'] or float('nan'):9.4f} {e['test_loss']:9.4f}")
    print(result.summary["verdict"])
    print(f"files: {result.out_dir}")
    return 0
