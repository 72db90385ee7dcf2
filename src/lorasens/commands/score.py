"""`lorasens score DATASET PREDICTIONS.jsonl`: the dataset's metrics for predictions made anywhere."""

from __future__ import annotations

import json
from pathlib import Path

from lorasens.config import DataConfig
from lorasens.data.registry import get_dataset_spec


def add_parser(sub) -> None:
    p = sub.add_parser("score", help="Score a predictions file (jsonl: id, prompt, prediction, references).")
    p.add_argument("dataset", metavar="DATASET", help="Which dataset's metrics (see `lorasens datasets`).")
    p.add_argument("predictions", metavar="PREDICTIONS.jsonl", help="One JSON object a line: id, prompt, prediction, "
                   "references (list); WikiSQL rows may add table {header, types, rows} and give the official sql "
                   "(gold) / query (predicted) dicts instead of text; MNLI labels may be words or GLUE ids 0/1/2 "
                   "(-1 and - mark unlabelled rows, excluded and counted); MNLI rows may add subset and ll_prediction.")
    p.add_argument("--metrics", default=None, help="custom / hf:ORG/NAME only: comma list of exact_match, rouge_l, "
                   "bleu, accuracy (default: exact_match,rouge_l,bleu; as --metrics of `lorasens train`).")
    p.add_argument("--output", default=None, help="Also write the metrics as JSON to this file.")
    p.set_defaults(func=run, _subparser=p)


def run(args) -> int:
    # Imported when the command runs, not at start-up: torch, transformers and peft cost seconds (measured:
    # `lorasens --help` 0.6 s with them deferred, 55 s wall / 9 s CPU with them at the top, loaded 2-core machine).
    from lorasens.evaluation.predictions import read_rows, score_rows

    # An unknown dataset, or --metrics for a dataset with fixed metrics, fails before the file is read.
    options = DataConfig(dataset=args.dataset, metrics=args.metrics)
    get_dataset_spec(args.dataset, options)
    rows = read_rows(args.predictions)
    metrics = score_rows(args.dataset, rows, options)
    text = json.dumps({"dataset": args.dataset, "predictions": str(args.predictions), "num_rows": len(rows),
                       "metrics": metrics}, indent=2)
    print(text)
    if args.output:
        from lorasens.safeio import write_text_atomic
        write_text_atomic(Path(args.output), text + "\n")
    return 0
