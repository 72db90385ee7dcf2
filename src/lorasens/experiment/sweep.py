"""`lorasens sweep`: run a grid of experiments (strategies x targets x seeds), then compare them.

Each run is a subprocess `python -m lorasens train ...`, so `--jobs N` runs N at once and a crash in one run cannot
take the others down. The sweep is restartable: a run whose directory holds summary.json is complete and skipped;
one with config.json but no summary.json was interrupted and is rerun from scratch with --overwrite. Killing a
sweep and starting the same command again therefore continues where it stopped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from lorasens.config import build_config, fields_with
from lorasens.errors import Interrupted, UserError
from lorasens.experiment.compare import compare_runs
from lorasens.rundir import RunStatus, run_status
from lorasens.rundir.lock import live_holder
from lorasens.safeio import write_json

logger = logging.getLogger(__name__)

STATIC = "static"  # the strategy word for "no phase schedule": LoRA on --target for the whole run
Status = RunStatus
# Flags the sweep sets itself for every run; giving them too would be ambiguous.
SWEEP_OWNED = {"experiment_name": "the sweep names its runs (use --sweep_name)",
               "overwrite": "the sweep reruns incomplete runs with --overwrite itself",
               "resume": "the sweep reruns incomplete runs from scratch"}
# Exit codes of a run stopped by Ctrl-C or SIGTERM: its own handler (130, 143) or killed by the signal (-2, -15).
INTERRUPTED_CODES = {130, 143, -signal.SIGINT, -signal.SIGTERM}
GRID_FLAGS = {"phase_strategy": "strategies", "target": "targets", "seed": "seeds"}


@dataclass(frozen=True)
class SweepRun:
    name: str
    run_dir: Path
    sweep: str  # the sweep's name: prefix of run names, of its log folder and its comparison
    strategy: str | None  # None: the config's own (not swept)
    target: str | None
    seed: int | None

    def status(self) -> Status:
        return run_status(self.run_dir)


@dataclass
class SweepResult:
    runs: list[SweepRun]
    outcome: dict[str, str]  # run name -> skipped (complete) | done | interrupted | failed (exit code N)
    comparison_dir: Path | None
    manifest: Path

    @property
    def failed(self) -> list[str]:
        return [name for name, result in self.outcome.items() if result.startswith("failed")]


def split_list(text: str | None, flag: str) -> list[str] | None:
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UserError(f"--{flag} needs a comma list, got {text!r}")
    return list(dict.fromkeys(items))


def split_strategies(text: str | None) -> list[str] | None:
    """Strategies are separated by commas, but `lisa:layers=2,interval=50` holds commas itself: keep key=value parts."""
    if text is None:
        return None
    items: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if items and re.fullmatch(r"[a-z_]+=\S+", part) and ":" in items[-1]:
            items[-1] += "," + part
        else:
            items.append(part)
    if not items:
        raise UserError(f"--strategies needs a comma list (e.g. static,both->mlp->attn), got {text!r}")
    return list(dict.fromkeys(items))


def slug(text: str) -> str:
    text = text.replace("->", "-").replace("@", "_").replace("%", "pct")
    return re.sub(r"_+", "_", "".join(c if c.isalnum() or c in ".-" else "_" for c in text)).strip("_")


def plan_sweep(
    preset: str | None,
    config_file: str | None,
    overrides: dict,
    strategies: list[str] | None,
    targets: list[str] | None,
    seeds: list[str] | None,
    sweep_name: str | None = None,
) -> list[SweepRun]:
    """The grid, each run's config built and validated now, so a typo fails before any run starts."""

    for flag, reason in SWEEP_OWNED.items():
        if flag in overrides:
            raise UserError(f"sweep: --{flag} cannot be given: {reason}")
    grid = {"strategies": strategies, "targets": targets, "seeds": seeds}
    for flag, grid_flag in GRID_FLAGS.items():
        if flag in overrides and grid[grid_flag] is not None:
            raise UserError(f"sweep: give --{grid_flag} or --{flag}, not both")
    for value in seeds or []:
        if not value.lstrip("-").isdigit():
            raise UserError(f"--seeds must be integers, got {value!r}")
    base = build_config(preset, config_file, _point_overrides(overrides, (strategies or [None])[0]))
    prefix = slug(sweep_name or base.preset or f"{base.data.dataset}")
    runs = []
    for strategy in strategies or [None]:
        for target in targets or [None]:
            for seed in seeds or [None]:
                run_overrides = _point_overrides(overrides, strategy)
                parts = [prefix]
                if strategy is not None:
                    parts.append(slug(strategy))
                if target is not None:
                    run_overrides["target"] = target
                    parts.append(slug(target))
                if seed is not None:
                    run_overrides["seed"] = seed
                    parts.append(f"seed{seed}")
                run_overrides["experiment_name"] = "_".join(parts)
                cfg = build_config(preset, config_file, run_overrides)
                runs.append(SweepRun(cfg.experiment_name, cfg.run_dir, prefix, strategy, target,
                                     int(seed) if seed is not None else None))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UserError("sweep: two grid points map to the same run name; make --strategies/--targets distinct")
    return runs


# Settings of a phase schedule; a static grid point has no phases, so they do not apply to it.
SCHEDULE_ONLY = fields_with("schedule_only")


def _strategy_overrides(strategy: str) -> dict:
    if strategy == STATIC:
        return {"phase_strategy": None, "dynamic_lora": False}
    return {"phase_strategy": strategy, "dynamic_lora": True}


def _point_overrides(overrides: dict, strategy: str | None) -> dict:
    """The sweep-wide flags for one grid point: `static` drops the schedule-only ones (e.g. --phase_ends)."""
    values = dict(overrides)
    if strategy is not None:
        if strategy == STATIC:
            for key in SCHEDULE_ONLY:
                values.pop(key, None)
        values.update(_strategy_overrides(strategy))
    return values


def train_command(run: SweepRun, preset: str | None, config_file: str | None, overrides: dict, rerun: bool) -> list[str]:
    """`python -m lorasens train` with the sweep's flags, this grid point's values and its run name."""
    command = [sys.executable, "-m", "lorasens", "train"]
    if preset:
        command += ["--preset", preset]
    if config_file:
        command += ["--config", config_file]
    values = _point_overrides(overrides, run.strategy)
    if run.target is not None:
        values["target"] = run.target
    if run.seed is not None:
        values["seed"] = run.seed
    values["experiment_name"] = run.name
    values["output_dir"] = str(run.run_dir.parent)
    for key, value in values.items():
        command += [f"--{key}", "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)]
    if rerun:
        command += ["--overwrite", "true"]
    return command


class _Children:
    """Running subprocesses, so an interrupted sweep stops them instead of leaving orphans."""

    def __init__(self):
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self.stopping = False

    def run(self, command: list[str], log_path: Path, env: dict, on_start: Callable[[], None] = lambda: None
            ) -> int | None:
        """The run's exit code; None when the sweep is stopping (the run was not started: `on_start` not called).

        The log is appended to (a rerun's output follows the earlier one; never truncated under a writer), and the
        child gets SIGTERM when the sweep dies, even by kill -9 (Linux parent-death signal)."""
        if self.stopping:
            return None
        with log_path.open("a") as log:
            with self._lock:
                if self.stopping:
                    return None
                log.write(f"$ {shlex.join(command)}  # {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                log.flush()
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        preexec_fn=_die_with_parent(os.getpid()))
                self._procs.add(proc)
                on_start()
            try:
                return proc.wait()
            finally:
                with self._lock:
                    self._procs.discard(proc)

    def stop(self) -> None:
        with self._lock:
            self.stopping = True
            procs = list(self._procs)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when the sweep's thread that started it dies (kill -9 included)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):  # not Linux: the sweep's own SIGINT/SIGTERM handling still stops children
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the sweep died before prctl: stop now
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


PR_SET_PDEATHSIG = 1
LIVE_WAIT_S = 60.0  # how long a rerun waits for a run still written by a process of an earlier (killed) sweep


def wait_for_live_writers(runs: list[SweepRun], timeout: float = LIVE_WAIT_S) -> None:
    """A run whose lock a live process holds (the child of a sweep killed a moment ago, still stopping) is waited
    for; still held after `timeout`, the sweep stops with one line naming the holder."""
    deadline = time.time() + timeout
    for run in runs:
        holder = live_holder(run.run_dir)
        if holder is None:
            continue
        logger.info("sweep: %s is still being written by %s; waiting up to %.0f s", run.name, holder, timeout)
        while holder is not None and time.time() < deadline:
            time.sleep(0.5)
            holder = live_holder(run.run_dir)
        if holder is not None:
            raise UserError(f"sweep: {run.run_dir} is still being written by {holder}; let it finish or stop it, "
                            "then rerun this command")


def run_sweep(
    runs: list[SweepRun],
    preset: str | None,
    config_file: str | None,
    overrides: dict,
    jobs: int = 1,
    compare_out: str | Path | None = None,
) -> SweepResult:
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    output_dir = runs[0].run_dir.parent
    prefix = runs[0].sweep
    output_dir.mkdir(parents=True, exist_ok=True)
    logs = output_dir / f"{prefix}_sweep_logs"
    logs.mkdir(exist_ok=True)
    manifest = output_dir / f"{prefix}_sweep.json"
    outcome: dict[str, str] = {}
    todo = []
    for run in runs:
        status = run.status()
        if status == "complete":
            outcome[run.name] = "skipped (complete)"
        else:
            todo.append((run, status == "incomplete"))
    wait_for_live_writers([run for run, _ in todo])
    logger.info("sweep: %d run(s), %d complete, %d to run (%d incomplete, rerun with --overwrite), %d at a time",
                len(runs), len(runs) - len(todo), len(todo), sum(rerun for _, rerun in todo), jobs)
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        # N parallel runs share the cores instead of each starting one thread per core.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    children = _Children()
    lock = threading.Lock()

    def one(item: tuple[SweepRun, bool]) -> None:
        run, rerun = item
        started = time.time()
        code = children.run(train_command(run, preset, config_file, overrides, rerun), logs / f"{run.name}.log", env,
                            lambda: logger.info("sweep: start %s%s", run.name,
                                                " (rerun of an incomplete run)" if rerun else ""))
        if code is None:
            return  # the sweep was interrupted before this run started
        if code == 0 and run.status() == "complete":
            result = "done"
        elif children.stopping or code in INTERRUPTED_CODES:
            result = "interrupted"  # Ctrl-C / SIGTERM reached the run (directly or from the sweep): not a failure
        else:
            result = f"failed (exit code {code})"
        with lock:
            outcome[run.name] = result
            _write_manifest(manifest, runs, outcome)
        logger.info("sweep: %s %s in %.0f s%s", run.name, result, time.time() - started,
                    "" if result == "done" else f"; log: {logs / (run.name + '.log')}")

    _write_manifest(manifest, runs, outcome)
    previous = _raise_on_sigterm()
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        for future in [pool.submit(one, item) for item in todo]:
            future.result()
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: stop the running children too, say how to continue
        children.stop()
        raise Interrupted(getattr(exc, "signum", signal.SIGINT), "continue with: the same command ("
                          f"{shlex.join(['lorasens', *sys.argv[1:]])}); complete runs are skipped") from None
    except BaseException:  # anything else: stop the running children too, so none is left orphaned
        children.stop()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    complete = [r.run_dir for r in runs if r.status() == "complete"]
    comparison = None
    if complete:

        comparison = compare_runs(complete, compare_out or output_dir / f"{prefix}_comparison").out_dir
    _write_manifest(manifest, runs, outcome, comparison)
    return SweepResult(runs, outcome, comparison, manifest)


def _raise_on_sigterm():
    """Turn SIGTERM into `Interrupted` in the main thread (the default would kill the sweep but not its children)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Interrupted(signum)

    return signal.signal(signal.SIGTERM, handler)


def _write_manifest(path: Path, runs: list[SweepRun], outcome: dict, comparison: Path | None = None) -> None:
    data = {"runs": [{**{k: str(v) if isinstance(v, Path) else v for k, v in asdict(r).items()},
                      "status": r.status(), "outcome": outcome.get(r.name)} for r in runs],
            "comparison": str(comparison) if comparison else None}
    write_json(path, data)
