"""Phase switching during real training runs on tiny-random-llama (4 layers x 7 LoRA modules).

A recording callback (put where the analysis callbacks go) snapshots, at every step, which LoRA matrices require
grad, which ones got a gradient, their values and their AdamW state, and which activations require grad.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from peft.tuners.lora import LoraLayer
from transformers import TrainerCallback

import lorasens.experiment.run as run_module
from lorasens.config import build_config
from lorasens.model.lora import PEFT_PREFIX

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL = ATTN + MLP
REPO = Path(__file__).resolve().parents[1]

FAST = {
    "model": "tiny-random-llama", "dataset": "synthetic", "max_length": 64, "batch_size": 2, "train_samples": 300,
    "eval_samples": 8, "eval_steps": 0, "evaluate": False, "ablation": False, "track_gradients": False,
    "track_importance": False, "track_update_magnitude": False, "lr": 1e-3, "lr_scheduler": "constant",
    "warmup_steps": 0, "weight_decay": 0.1, "logging_steps": 1,
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny-model ops are too small to gain from two threads, and on a busy machine the threads' barriers cost
    seconds per step (measured 0.1 s -> 7 s per step under load); restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def names(layers, types) -> frozenset[str]:
    return frozenset(f"model.layers.{l}.{'self_attn' if t in ATTN else 'mlp'}.{t}" for l in layers for t in types)


def lora_of(model) -> list[SimpleNamespace]:
    """(module name, A, B) of every LoRA layer of a PEFT model, found on its own (as a user's callback would)."""
    return [SimpleNamespace(module=SimpleNamespace(name=name.removeprefix(PEFT_PREFIX)),
                            A=mod.lora_A["default"].weight, B=mod.lora_B["default"].weight)
            for name, mod in model.named_modules() if isinstance(mod, LoraLayer) and "default" in mod.lora_A]


class Recorder(TrainerCallback):
    """Snapshots per optimizer step (keys are `state.global_step` before the step, i.e. steps completed)."""

    def __init__(self):
        self.lora: list[SimpleNamespace] = []  # found in the PEFT model at train begin
        self.trainable: dict[int, frozenset[str]] = {}
        self.with_grad: dict[int, dict[str, tuple[float, float]]] = {}
        self.weights: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.adam_steps: dict[int, dict[str, int | None]] = {}
        self.optimizer_params: set[int] = set()
        self.embedding_requires_grad: list[bool] = []
        self.layer_inputs: dict[int, list[tuple[int, bool]]] = {}
        self.layer_runs: dict[int, list[int]] = {}  # layer indices, once per execution (forward or recompute)
        self._step = 0

    def _snapshot(self, step):
        self.weights[step] = {lp.module.name: (lp.A.detach().clone(), lp.B.detach().clone()) for lp in self.lora}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.lora = lora_of(model)
        self.optimizer_params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self._snapshot(state.global_step)
        base = model.get_base_model()
        base.model.embed_tokens.register_forward_hook(lambda m, i, out: self.embedding_requires_grad.append(out.requires_grad))
        for index, layer in enumerate(base.model.layers):
            layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True)
            # transformers checkpoints `forward`, so hooks on the layer itself run once; a submodule's hook also runs
            # when backward recomputes the layer.
            layer.input_layernorm.register_forward_pre_hook(
                lambda m, a, index=index: self.layer_runs.setdefault(self._step, []).append(index)
            )

    def _layer_hook(self, index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.layer_inputs.setdefault(self._step, []).append((index, hidden.requires_grad))

        return hook

    def on_step_begin(self, args, state, control, **kwargs):
        self._step = state.global_step
        on = {lp.module.name for lp in self.lora if lp.A.requires_grad}
        assert on == {lp.module.name for lp in self.lora if lp.B.requires_grad}
        self.trainable[state.global_step] = frozenset(on)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.with_grad[state.global_step] = {
            lp.module.name: (float(lp.A.grad.norm()), float(lp.B.grad.norm()))
            for lp in self.lora
            if lp.A.grad is not None or lp.B.grad is not None
        }

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self._snapshot(state.global_step)
        inner = getattr(optimizer, "optimizer", optimizer)
        self.adam_steps[state.global_step] = {
            lp.module.name: int(inner.state[lp.A]["step"]) if "step" in inner.state.get(lp.A, {}) else None
            for lp in self.lora
        }


class CrashAt(TrainerCallback):
    """Simulates a crash (e.g. a killed job) after `step` optimizer steps."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated crash at step {self.step}")


def train(monkeypatch, tmp_path, name, extra_callbacks=(), **overrides):
    """Run a full experiment through `run_experiment`; return (run_dir, recorder)."""
    recorder = Recorder()
    cfg = build_config(cli_overrides={**FAST, "output_dir": str(tmp_path), "experiment_name": name, **overrides})
    # Evaluation, analysis and report are other areas' work (and tested there); skip them to keep these tests fast.
    result = run_module.run_experiment(cfg, callbacks=[recorder, *extra_callbacks], after_training=())
    return result.run_dir, recorder


def changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.equal(a, b)


def phase_starts(ends):
    return [0, *ends[:-1]]


# strategy, phase ends for max_steps 6, expected module set per phase
STRATEGIES = [
    ("both->mlp->attn", "2,4", [names(range(4), ALL), names(range(4), MLP), names(range(4), ATTN)]),
    ("attn->mlp->both", "2,4", [names(range(4), ATTN), names(range(4), MLP), names(range(4), ALL)]),
    ("both->mlp->both", "2,4", [names(range(4), ALL), names(range(4), MLP), names(range(4), ALL)]),
    ("early->late", "3", [names((0, 1), ALL), names((2, 3), ALL)]),
    ("q,v@0-1->mlp@2-3", "3", [names((0, 1), ("q_proj", "v_proj")), names((2, 3), MLP)]),
    ("attn@0-50%->mlp", "3", [names((0, 1), ATTN), names(range(4), MLP)]),
]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, ends, expected", STRATEGIES, ids=[s[0] for s in STRATEGIES])
def test_switching_freezes_exactly_and_bitwise(monkeypatch, tmp_path, strategy, ends, expected):
    run_dir, rec = train(monkeypatch, tmp_path, "run", phase_strategy=strategy, phase_ends=ends, max_steps=6)
    bounds = [int(e) for e in ends.split(",")] + [6]
    lora_on = frozenset().union(*expected)
    # All LoRA parameters of all phases are in the optimizer from step 0 (also those frozen in phase 1).
    assert {id(p) for lp in rec.lora for p in (lp.A, lp.B)} <= rec.optimizer_params
    assert {lp.module.name for lp in rec.lora} == lora_on
    for phase, (start, end) in enumerate(zip(phase_starts(bounds), bounds)):
        active = expected[phase]
        for step in range(start, end):
            assert rec.trainable[step] == active, f"step {step}"
            assert set(rec.with_grad[step]) == active, f"step {step}: frozen modules must have .grad None"
        before, after = rec.weights[start], rec.weights[end]
        for name in lora_on:
            (a0, b0), (a1, b1) = before[name], after[name]
            if name in active:
                assert changed(a0, a1) and changed(b0, b1), f"{name} should train in phase {phase + 1}"
            else:
                assert torch.equal(a0, a1) and torch.equal(b0, b1), f"{name} moved while frozen in phase {phase + 1}"
        # A module that is active gets a non-zero gradient on B in every step of the phase.
        assert all(rec.with_grad[step][n][1] > 0 for step in range(start, end) for n in active)

    phases = json.loads((run_dir / "phases.json").read_text())
    assert phases["ends"] == bounds
    assert [t["step"] for t in phases["transitions"]] == phase_starts(bounds)
    assert [frozenset(t["trainable_modules"]) for t in phases["transitions"]] == expected
    assert [t["trainable_params"] for t in phases["transitions"]] == [
        sum(lp.A.numel() + lp.B.numel() for lp in rec.lora if lp.module.name in e) for e in expected
    ]
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    labels = phases["phases"]
    assert [(r["step"], r["phase"]) for r in log] == [
        (s, labels[next(i for i, e in enumerate(bounds) if s <= e)]) for s in range(1, 7)
    ]


@pytest.mark.slow
def test_attn_mlp_both_trains_mlp_in_phase_2(monkeypatch, tmp_path):
    """The old tool's bug: MLP frozen at optimizer creation never trained. Here it is in the optimizer from step 0."""
    run_dir, rec = train(monkeypatch, tmp_path, "run", phase_strategy="attn->mlp->both", phase_ends="2,4", max_steps=6)
    mlp = names(range(4), MLP)
    mlp_params = {id(p) for lp in rec.lora if lp.module.name in mlp for p in (lp.A, lp.B)}
    assert len(mlp_params) == 24 and mlp_params <= rec.optimizer_params
    # No AdamW state while frozen in phase 1; one step of state per phase-2 step afterwards.
    assert all(rec.adam_steps[2][n] is None for n in mlp)
    assert all(rec.adam_steps[4][n] == 2 for n in mlp)
    for n in mlp:
        (a2, b2), (a4, b4) = rec.weights[2][n], rec.weights[4][n]
        assert torch.count_nonzero(b2) == 0  # LoRA B starts at zero and stayed there while frozen
        assert float((a4 - a2).norm()) > 0 and float(b4.norm()) > 0


@pytest.mark.slow
def test_early_late_with_gradient_checkpointing(monkeypatch, tmp_path):
    """Layers after a frozen prefix get gradients, and backward stops at the first trainable layer."""
    run_dir, rec = train(
        monkeypatch, tmp_path, "run", phase_strategy="early->late", phase_ends="3", max_steps=6,
        gradient_checkpointing=True,
    )
    early, late = names((0, 1), ALL), names((2, 3), ALL)
    for step in range(3, 6):
        assert set(rec.with_grad[step]) == late
    # Every late matrix (A and B) gets a non-zero gradient in phase 2 (A once B has left zero after one step).
    for n in late:
        assert max(rec.with_grad[s][n][0] for s in range(3, 6)) > 0
        assert min(rec.with_grad[s][n][1] for s in range(3, 6)) > 0
        assert all(changed(x, y) for x, y in zip(rec.weights[3][n], rec.weights[6][n]))
    for n in early:
        assert all(torch.equal(x, y) for x, y in zip(rec.weights[3][n], rec.weights[6][n]))

    # Backward truncation: the embedding output never requires grad (no require-grads hook is active), and in
    # phase 2 no activation below layer 2 requires grad, so autograd never enters layers 0-1.
    assert rec.embedding_requires_grad and not any(rec.embedding_requires_grad)
    for step in range(3, 6):
        calls = rec.layer_inputs[step]
        assert {(i, g) for i, g in calls} == {(0, False), (1, False), (2, False), (3, True)}
        # Checkpointing is really on: layers 2-3 are recomputed in backward, frozen layers 0-1 are not.
        assert [rec.layer_runs[step].count(k) for k in range(4)] == [1, 1, 2, 2]
    for step in range(0, 3):
        calls = rec.layer_inputs[step]
        assert {(i, g) for i, g in calls} == {(0, False), (1, True), (2, True), (3, True)}
        assert [rec.layer_runs[step].count(k) for k in range(4)] == [2, 2, 2, 2]


@pytest.mark.slow
@pytest.mark.parametrize("reset", [False, True])
def test_reset_optimizer_on_switch(monkeypatch, tmp_path, reset):
    """both->mlp->both: attention trains, is frozen, trains again. Its AdamW state is kept, or reset with the flag."""
    _, rec = train(
        monkeypatch, tmp_path, "run", phase_strategy="both->mlp->both", phase_ends="2,4", max_steps=6,
        reset_optimizer_on_switch=reset,
    )
    attn, mlp = names(range(4), ATTN), names(range(4), MLP)
    assert all(rec.adam_steps[4][n] == 2 for n in attn)  # frozen in phase 2: no steps taken
    assert all(rec.adam_steps[5][n] == (1 if reset else 3) for n in attn)
    assert all(rec.adam_steps[6][n] == (2 if reset else 4) for n in attn)
    assert all(rec.adam_steps[6][n] == 6 for n in mlp)  # never re-activated: never reset


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.mark.parametrize(
    "crash_at, resumed_from, reset",
    [(7, 6, False), (9, 8, True)],
    ids=["mid-phase", "at-boundary-with-reset"],
)
@pytest.mark.slow
def test_resume_matches_uninterrupted_run(monkeypatch, tmp_path, crash_at, resumed_from, reset):
    settings = dict(phase_strategy="both->mlp->attn", phase_ends="4,8", max_steps=12, save_steps=2,
                    reset_optimizer_on_switch=reset)
    full_dir, _ = train(monkeypatch, tmp_path, "full", **settings)
    with pytest.raises(KeyboardInterrupt):
        train(monkeypatch, tmp_path, "resumed", extra_callbacks=[CrashAt(crash_at)], **settings)
    partial = tmp_path / "resumed"
    assert not (partial / "final_model").exists()
    assert max(int(p.name.split("-")[1]) for p in (partial / "checkpoints").glob("checkpoint-*")) == resumed_from
    resumed_dir, rec = train(monkeypatch, tmp_path, "resumed", resume=True, **settings)
    assert min(rec.trainable) == resumed_from

    full = load_file(full_dir / "final_model" / "adapter_model.safetensors")
    resumed = load_file(resumed_dir / "final_model" / "adapter_model.safetensors")
    assert full.keys() == resumed.keys() and len(full) == 56
    assert max(float((full[k] - resumed[k]).abs().max()) for k in full) <= 1e-6

    # The run directory reads as one continuous run: same transitions, one log line per step, same phases.
    assert json.loads((resumed_dir / "phases.json").read_text()) == json.loads((full_dir / "phases.json").read_text())
    full_log, resumed_log = _read_jsonl(full_dir / "train_log.jsonl"), _read_jsonl(resumed_dir / "train_log.jsonl")
    assert [r["step"] for r in resumed_log] == list(range(1, 13))
    assert [r["phase"] for r in resumed_log] == [r["phase"] for r in full_log] == ["both"] * 4 + ["mlp"] * 4 + ["attn"] * 4
    assert [r["loss"] for r in resumed_log] == pytest.approx([r["loss"] for r in full_log], abs=1e-5)


@pytest.mark.slow
def test_cli_black_box_checkpoints(tmp_path):
    """The issue's black-box check through the real CLI: frozen groups are identical between checkpoints."""
    command = [
        sys.executable, "-m", "lorasens", "train", "--model", "tiny-random-llama", "--dataset", "synthetic",
        "--lr_scheduler", "constant", "--warmup_steps", "0", "--weight_decay", "0.1", "--eval_steps", "0",
        "--save_steps", "4", "--max_steps", "12", "--phase_strategy", "both->mlp->attn", "--phase1_end", "4",
        "--phase2_end", "8", "--batch_size", "2", "--max_length", "64", "--train_samples", "300",
        "--eval_samples", "8", "--evaluate", "false", "--ablation", "false", "--track_gradients", "false",
        "--track_importance", "false", "--track_update_magnitude", "false",
        "--output_dir", str(tmp_path), "--experiment_name", "cli",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "step 4: phase 2 (mlp)" in done.stderr and "step 8: phase 3 (attn)" in done.stderr
    ckpt = {s: load_file(tmp_path / "cli" / "checkpoints" / f"checkpoint-{s}" / "adapter_model.safetensors") for s in (4, 8, 12)}
    attn = [k for k in ckpt[4] if ".self_attn." in k]
    mlp = [k for k in ckpt[4] if ".mlp." in k]
    assert len(attn) == 32 and len(mlp) == 24 and len(ckpt[4]) == 56
    assert all(torch.equal(ckpt[4][k], ckpt[8][k]) for k in attn)
    assert all(not torch.equal(ckpt[4][k], ckpt[8][k]) for k in mlp)
    assert all(torch.equal(ckpt[8][k], ckpt[12][k]) for k in mlp)
    assert all(not torch.equal(ckpt[8][k], ckpt[12][k]) for k in attn)


@pytest.mark.slow
def test_lisa_switches_whole_layers_every_interval(monkeypatch, tmp_path):
    from lorasens.model.module_map import build_module_map
    from lorasens.model.loading import build_tiny_random_llama
    from lorasens.model.schedule import parse_schedule

    run_dir, rec = train(monkeypatch, tmp_path, "run", phase_strategy="lisa:layers=2,interval=3", max_steps=9)
    module_map = build_module_map(build_tiny_random_llama(seed=0).model)
    schedule = parse_schedule("lisa:layers=2,interval=3", 9, module_map=module_map, seed=42)
    transitions = json.loads((run_dir / "phases.json").read_text())["transitions"]
    assert [t["step"] for t in transitions] == [0, 3, 6]
    for block, start in enumerate((0, 3, 6)):
        active = rec.trainable[start]
        layers = {int(n.split(".")[2]) for n in active}
        assert len(layers) == 2 and active == names(layers, ALL)
        # The layers drawn in training are the schedule's for the run's seed (42), reproducible from the data.
        assert active == {m.name for m in schedule.modules(block, module_map)}
        assert frozenset(transitions[block]["trainable_modules"]) == active
        for step in range(start, start + 3):
            assert rec.trainable[step] == active and set(rec.with_grad[step]) == active
        for n in names(range(4), ALL) - active:
            assert all(torch.equal(x, y) for x, y in zip(rec.weights[start][n], rec.weights[start + 3][n]))
        for n in active:
            assert all(changed(x, y) for x, y in zip(rec.weights[start][n], rec.weights[start + 3][n]))
