"""A small budget on E2E: where rank 1 on every module does not fit, which placement trains best? The probe's
placements at 6.25% of the all-module LoRA parameters (validate's own planner: `recommended`, `ranks`, `uniform`,
EVA, random sets, `q,v`, `mlp`) and three rank-1 placements of the same size: the most sensitive modules (the
`combined` order), the least sensitive (the order reversed) and a random set. Sweep trainings only (seed 1, 75 steps,
3e-3 and 1e-2); a later `lorasens validate docs/results/e2e/probe --budget 0.0625 ...` with the same settings reuses
the plan and the sweeps.

    python benchmarks/placement/small_budget.py [ARM,ARM...]    # default: every arm; rerun to continue
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import sys
from pathlib import Path

from lorasens.analysis.budget import ModuleSize, select_within_budget
from lorasens.analysis.sensitivity import COMBINED
from lorasens.experiment.validation import arms as A
from lorasens.experiment.validation import driver as D
from lorasens.rundir.load import read_run_config

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "docs" / "results" / "e2e" / "probe"
OUT = ROOT / "docs" / "results" / "e2e" / "validation_budget0.0625"
SETTINGS = D.ValidateSettings(arms=("recommended", "ranks", "uniform", "eva", "random", "qv", "mlp"), seeds=(1,),
                              random_sets=2, max_steps=150, sweep_steps=75, lr_grid=(3e-3, 1e-2), budget=0.0625)


def rank_one_arms(sizes: dict[str, ModuleSize], combined: dict[str, float | None], target: int) -> list[A.Arm]:
    """The most and the least sensitive modules at rank 1, and a random set at rank 1, each within 5% of target."""
    scores = {k: (float("nan") if v is None else v) for k, v in combined.items()}
    top = select_within_budget(list(sizes.values()), scores, target, "params", 1).keys
    low = select_within_budget(list(sizes.values()), {k: -v for k, v in scores.items()}, target, "params", 1).keys
    rng = random.Random("small-budget-random-r1")
    # Not A.matched_random (which fills below the target, then adds the closest left-out module): this is the picker
    # the recorded sweep trained, and a rerun rebuilds the set from it, so it must stay the same draw.
    while True:
        pick, used = [], 0
        for key in rng.sample(list(sizes), len(sizes)):
            if used + sizes[key].params(1) <= target:
                pick.append(key)
                used += sizes[key].params(1)
        if abs(used - target) <= A.MATCH_TOLERANCE * target:
            break
    return [A.Arm(name, "ranks", dict.fromkeys(keys, 1)) for name, keys in
            (("top_r1", top), ("random_r1", pick), ("bottom_r1", low))]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    settings = SETTINGS.check()
    cfg = read_run_config(PROBE)
    plan_settings = {**dataclasses.asdict(settings), "max_steps": settings.max_steps, "sweep_steps": settings.sweep_steps}
    arms, budget, _, _ = D._plan(cfg, PROBE, settings, OUT, plan_settings, False)
    sizes = {k: ModuleSize(k, *v) for k, v in budget["module_sizes"].items()}
    combined = json.loads((PROBE / "sensitivity.json").read_text())["measures"][COMBINED]
    arms = D._swept(arms) + rank_one_arms(sizes, combined, budget["lora_params"])
    wanted = sys.argv[1].split(",") if len(sys.argv) > 1 else None
    for arm in arms:
        if wanted and arm.name not in wanted:
            continue
        logging.info("%s: %d modules, %d LoRA parameters", arm.name, len(arm.ranks), arm.params(sizes))
        for lr in settings.lr_grid:
            D._run_job(cfg, D._sweep_job(arm, settings, lr, settings.sweep_steps, OUT), OUT, {}, f"sweep {arm.name} {lr:g}")
            logging.info("%s at %g: validation loss %.4f", arm.name, lr, D._sweep_loss(OUT, arm, lr))


if __name__ == "__main__":
    main()
