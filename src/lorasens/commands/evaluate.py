"""`lorasens eval RUN_DIR`: generate and score a finished run's adapter on its dataset's held-out split."""

from __future__ import annotations

import json

from lorasens.config import with_overrides
from lorasens.rundir.files import evaluation_file, predictions_file


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="Evaluate a finished run (writes {dataset}_predictions.jsonl and {dataset}_evaluation.json).")
    p.add_argument("run_dir", help="Run directory written by `lorasens train`.")
    p.add_argument("--split", default="test", choices=("validation", "test"), help="Held-out split to evaluate (default: test).")
    p.add_argument("--num_samples", type=int, default=None, help="Distinct prompts to evaluate (default: the run's --eval_samples).")
    p.add_argument("--batch_size", type=int, default=None, help="Generation batch size (default: the run's --eval_batch_size).")
    p.add_argument("--max_new_tokens", type=int, default=None, help="Generation length (default: the run's setting, else the dataset's).")
    p.add_argument("--num_beams", type=int, default=None, help="Beam width (default: the run's setting; 1 = greedy).")
    p.add_argument("--data_dir", default=None,
                   help="Score on this data folder instead of the run's own data (e.g. an official test set obtained "
                        "later); the run's dataset reader and fields read it.")
    p.add_argument("--baseline", action="store_true", help="Also score the base model without LoRA, to show the gain.")
    p.set_defaults(func=run, _subparser=p)


def run(args) -> int:
    # Imported when the command runs, not at start-up: torch, transformers and peft cost seconds (measured:
    # `lorasens --help` 0.6 s with them deferred, 55 s wall / 9 s CPU with them at the top, loaded 2-core machine).
    from lorasens.evaluation.runner import evaluate_model, settings_from_config
    from lorasens.rundir.load import require_known
    from lorasens.training.context import load_run
    from lorasens.rundir.lock import hold_run_lock

    require_known(args.run_dir, {"data.dataset"}, "`lorasens eval` scores a run on its own dataset; score its "
                  "adapter on a registered one with lorasens.evaluation.api.evaluate_dataset(NAME, model_path=RUN_DIR)")
    with hold_run_lock(args.run_dir):  # one writer per run: not while a train/analyze writes into it
        loaded = load_run(args.run_dir)
        overrides = {name: getattr(args, name) for name in ("max_new_tokens", "num_beams") if getattr(args, name) is not None}
        if args.data_dir is not None:  # another folder replaces the run's own data (folder or files)
            overrides.update({"data_dir": args.data_dir, "data_files": None})
        cfg = with_overrides(loaded.cfg, overrides)
        settings = settings_from_config(cfg, args.split, args.num_samples, args.batch_size)
        result = evaluate_model(loaded.model, loaded.tokenizer, cfg, settings, args.baseline, args.run_dir)
    print(json.dumps({"metrics": result["metrics"], "baseline": result["baseline"]}, indent=2))
    print(f"wrote {args.run_dir}/{predictions_file(cfg.data.dataset)} and {evaluation_file(cfg.data.dataset)} "
          f"({result['num_examples']} prompts, {result['wall_time_s']} s)")
    return 0
