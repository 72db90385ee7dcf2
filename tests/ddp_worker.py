"""One process of the DDP test (tests/test_ddp.py): `torchrun --nproc_per_node 2 tests/ddp_worker.py SETTINGS_JSON`.

Runs a whole experiment through `run_experiment` with the settings given as a JSON object of config flags.
Evaluation, analysis and the report are skipped: the test compares the trained adapters only.
"""

from __future__ import annotations

import json
import sys

import torch


def main() -> int:
    import lorasens.experiment.run as run_module
    from lorasens.cli import release_process_group, setup_logging
    from lorasens.config import build_config

    setup_logging()  # phase transitions go to stderr, as with `lorasens train`
    torch.set_num_threads(1)  # two processes share a small CPU
    cfg = build_config(cli_overrides=json.loads(sys.argv[1]))
    run_module.run_experiment(cfg, after_training=())
    release_process_group()  # as `lorasens train` does at its end
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
