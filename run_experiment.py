#!/usr/bin/env python
"""`python run_experiment.py ARGS` is exactly `lorasens train ARGS` (the original tool's entry point)."""

import sys

from lorasens.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
