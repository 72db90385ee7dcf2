"""Helpers shared by the report/compare/sweep tests: one tiny real run per test session, PNG checks."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A tiny run that exercises the outputs the plots read: a phase schedule (frozen periods), validation, gradient
# tracking and a (small) ablation. Generation-based evaluation is off: its scores on a random model say nothing and
# the report tests write an evaluation file of known content instead (`write_evaluation`).
TINY_RUN = {
    "model": "tiny-random-llama", "dataset": "synthetic", "max_steps": 6, "max_length": 160, "batch_size": 4,
    "train_samples": 24, "eval_samples": 4, "eval_steps": 3, "eval_batch_size": 4, "evaluate": False,
    "phase_strategy": "both->mlp->attn", "dynamic_lora": True, "ablation_max_single": 2, "analysis_samples": 12,
    "logging_steps": 1, "report_to": "tensorboard",
}
_CACHE: dict[str, Path] = {}


def tiny_run_dir(tmp_path_factory) -> Path:
    """A finished tiny run (made once per session); tests that change files copy it first."""
    if "run" not in _CACHE:
        import torch

        from lorasens.config import build_config
        from lorasens.experiment.run import run_experiment

        out = tmp_path_factory.mktemp("tiny_runs")
        cfg = build_config(None, None, {**TINY_RUN, "output_dir": str(out), "experiment_name": "tiny"})
        # One compute thread: tiny-model ops gain nothing from two, and on a busy machine the threads' barriers
        # wait on descheduled threads (seconds per step).
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _CACHE["run"] = run_experiment(cfg).run_dir
        finally:
            torch.set_num_threads(before)
    return _CACHE["run"]


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("checkpoints", "final_model"))
    return dest


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk; asserts the file is a PNG."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR", f"{path}: first chunk is not IHDR"
    return struct.unpack(">II", data[16:24])


def write_evaluation(run_dir: Path, metrics: dict, baseline: dict | None = None, dataset: str = "synthetic") -> Path:
    """A `{dataset}_evaluation.json` (and predictions) in the schema the evaluation step writes."""
    import json

    path = Path(run_dir) / f"{dataset}_evaluation.json"
    path.write_text(json.dumps({
        "dataset": dataset, "split": "test", "num_examples": 4, "metrics": metrics,
        "baseline": {"metrics": baseline} if baseline is not None else None,
        "settings": {"num_beams": 1, "max_new_tokens": 8}, "wall_time_s": 0.5,
    }))
    (Path(run_dir) / f"{dataset}_predictions.jsonl").write_text(json.dumps(
        {"id": "0", "prompt": "name[The Eagle], food[French]", "prediction": "The Eagle serves French food.",
         "references": ["The Eagle is a French restaurant."]}) + "\n")
    return path
