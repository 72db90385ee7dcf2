"""lorasens in a user's own training script: `SensitivityCallback` and `PhaseScheduleCallback` under a plain
`transformers.Trainer` and TRL's `SFTTrainer`, checked against `lorasens train` on the same data, seed and settings.

Each script below is what a user writes: load a model, tokenise, wrap with PEFT, build the Trainer with the
callbacks. The features come from lorasens's own data functions only so that the data is identical to the
`lorasens train` run it is compared with.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments, set_seed

from lorasens import PhaseScheduleCallback, SensitivityCallback
from lorasens.analysis.budget import RANK_CHOICES
from lorasens.cli import main as cli_main
from lorasens.config import TrackingConfig, build_config
from lorasens.data.features import IGNORE_INDEX, build_features
from lorasens.data.registry import load_examples, training_splits
from lorasens.errors import UserError
from lorasens.experiment.run import run_experiment
from lorasens.model.loading import load_model
from lorasens.rundir import files

SEED = 7
STEPS = 6
# The `lorasens train` settings; the scripts pass the same values to TrainingArguments / SFTConfig / LoraConfig.
SETTINGS = dict(model="tiny-random-llama", dataset="synthetic", r=4, lora_alpha=8.0, lora_dropout=0.05, batch_size=4,
                max_length=128, eval_steps=0, evaluate=False, ablation=False, train_samples=48, eval_samples=12,
                lr=1e-2, max_steps=STEPS, seed=SEED, max_grad_norm=0.5, weight_decay=0.1)
LLAMA_TYPES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CSVS = (files.GROUP_NORMS, files.LAYER_NORMS, files.MODULE_NORMS, files.IMPORTANCE, files.UPDATE_MAGNITUDE)


def lorasens_train(out: Path, name: str, **overrides) -> Path:
    cfg = build_config(cli_overrides={**SETTINGS, "output_dir": str(out), "experiment_name": name, **overrides})
    return run_experiment(cfg, after_training=()).run_dir


def user_model_and_data():
    """What a user's script does before building the Trainer (same order of random draws as `lorasens train`)."""
    set_seed(SEED)
    loaded = load_model("tiny-random-llama", seed=SEED)
    # lorasens train holds its analysis split out of train; the same train examples here
    train, _ = training_splits("synthetic", None, SEED, SETTINGS["train_samples"], None)
    validation = load_examples("synthetic", "validation", None, SEED, SETTINGS["eval_samples"])
    splits = {name: build_features(examples, loaded.tokenizer, SETTINGS["max_length"], name)[0]
              for name, examples in (("train", train), ("validation", validation))}
    model = get_peft_model(loaded.model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=LLAMA_TYPES,
                                                    task_type="CAUSAL_LM"))
    return model, loaded.tokenizer, Dataset.from_list(splits["train"]), Dataset.from_list(splits["validation"])


def common_args(out: Path) -> dict:
    return dict(output_dir=str(out / "checkpoints"), max_steps=STEPS, per_device_train_batch_size=4,
                learning_rate=1e-2, lr_scheduler_type="linear", weight_decay=0.1, max_grad_norm=0.5, seed=SEED,
                data_seed=SEED, logging_steps=1, eval_strategy="no", save_strategy="no", report_to=[], use_cpu=True,
                bf16=False, dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)


def plain_trainer_script(out: Path, callbacks) -> Trainer:
    model, tokenizer, train, validation = user_model_and_data()
    tokenizer.padding_side = "right"
    trainer = Trainer(model=model, args=TrainingArguments(**common_args(out)), train_dataset=train,
                      eval_dataset=validation, processing_class=tokenizer,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
                      callbacks=callbacks)
    trainer.train()
    return trainer


def sft_script(out: Path, callbacks) -> Trainer:
    trl = pytest.importorskip("trl")  # a test dependency (requirements.lock); skipped, not passed, without it
    model, tokenizer, train, validation = user_model_and_data()
    args = trl.SFTConfig(**common_args(out), max_length=SETTINGS["max_length"], packing=False,
                         activation_checkpointing=False)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
                             processing_class=tokenizer, callbacks=callbacks)
    trainer.train()
    return trainer


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def assert_same_csvs(a: Path, b: Path) -> None:
    """Same rows, same labels and empty (frozen) cells, every number equal to 1e-6.

    The plain Trainer matches to the last float32 digit; SFTTrainer computes the loss from the logits with its own
    loss function instead of the model's, which moves gradients by float32 rounding (measured: at most 1e-7
    absolute, 1.3e-6 relative on a norm of 3e-5)."""
    for name in CSVS:
        rows_a, rows_b = read_csv(a / name), read_csv(b / name)
        assert len(rows_a) == len(rows_b) > 0, name
        for ra, rb in zip(rows_a, rows_b):
            assert ra.keys() == rb.keys()
            for key in ra:
                try:
                    va, vb = float(ra[key]), float(rb[key])
                except ValueError:
                    assert ra[key] == rb[key], (name, key, ra, rb)  # phase, group, module, matrix, empty cells
                    continue
                assert va == pytest.approx(vb, rel=1e-6, abs=1e-6), (name, key, ra, rb)


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    reference = lorasens_train(out, "lorasens_train")
    script_dir = out / "script"
    tracking = TrackingConfig(ablation=True, ablation_max_single=4)
    plain_trainer_script(out, [SensitivityCallback(script_dir, tracking=tracking, model_name="tiny-random-llama")])
    return reference, script_dir


def strict_json(path: Path):
    """json.loads that refuses NaN/Infinity (what other tools' strict parsers do)."""
    def refuse(name):
        raise ValueError(f"{path}: non-standard JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.slow
def test_a_diverging_script_run_writes_standard_json(tmp_path):
    """A user's script that diverges (an infinite learning rate: the loss turns NaN). Every JSON file the callback
    writes is still standard JSON (NaN and inf are null), as `lorasens train` writes it."""
    model, tokenizer, train, validation = user_model_and_data()
    tokenizer.padding_side = "right"
    script_dir = tmp_path / "script"
    # The Trainer's default logs a NaN loss as the mean of the earlier ones; this script logs the true loss.
    args = TrainingArguments(**{**common_args(tmp_path), "learning_rate": math.inf, "max_grad_norm": 0.0,
                                "logging_nan_inf_filter": False})
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=validation, processing_class=tokenizer,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
                      callbacks=[SensitivityCallback(script_dir, tracking=TrackingConfig(ablation_max_single=2),
                                                     model_name="tiny-random-llama")])
    trainer.train()
    log = [json.loads(line) for line in (script_dir / files.TRAIN_LOG).read_text().splitlines()]
    assert log[0]["loss"] > 0 and log[-1]["loss"] is None  # it diverged: NaN, written as null
    written = sorted(p.relative_to(script_dir).as_posix() for p in script_dir.glob("*.json"))
    assert {files.CONFIG_FILE, files.SUMMARY_FILE} <= set(written)
    for name in written:
        strict_json(script_dir / name)
    assert strict_json(script_dir / files.CONFIG_FILE)["training"]["lr"] is None  # inf: "Infinity" before safeio
    summary = strict_json(script_dir / files.SUMMARY_FILE)
    assert summary["final_train_loss"] is None and summary["diverged"]["step"] == 1  # the update of step 1 is NaN


@pytest.mark.slow
def test_plain_trainer_writes_the_csvs_of_lorasens_train(plain_runs):
    reference, script_dir = plain_runs
    assert_same_csvs(reference, script_dir)
    # The train log is the same too (loss and grad_norm of every step)
    ref_log = [json.loads(line) for line in (reference / files.TRAIN_LOG).read_text().splitlines()]
    log = [json.loads(line) for line in (script_dir / files.TRAIN_LOG).read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    for a, b in zip(ref_log, log):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
        assert a["phase"] == b["phase"] == "both"


@pytest.mark.slow
def test_script_run_has_sensitivity_recommendation_report_and_honest_config(plain_runs):
    reference, run = plain_runs
    n_val = json.loads((reference / files.SUMMARY_FILE).read_text())["validation_data"]["examples"]  # 9 of 12 fit
    sensitivity = json.loads((run / files.SENSITIVITY).read_text())
    assert set(sensitivity["measures"]) >= {"grad_norm", "importance", "update_magnitude", "first_order", "ablation"}
    assert len(sensitivity["modules"]) == 4 * len(LLAMA_TYPES)
    ablation = read_csv(run / files.ABLATION)
    assert sum(r["kind"] == "module" for r in ablation) == 4  # ablation_max_single
    recommended = json.loads((run / files.RECOMMENDED_CONFIG).read_text())
    # The default allocation: per-module ranks, each module's scaling alpha/r that of the run (8 / 4)
    assert recommended["target_modules"] and set(recommended["rank_pattern"].values()) <= set(RANK_CHOICES) - {0}
    assert all(recommended["alpha_pattern"][k] == 2 * r for k, r in recommended["rank_pattern"].items())
    assert (run / files.REPORT_FILE).read_text().startswith("<!DOCTYPE html>")
    assert (run / files.FINAL_MODEL / "adapter_config.json").exists()
    summary = json.loads((run / files.SUMMARY_FILE).read_text())
    assert summary["steps"] == STEPS and summary["analysis_data"] == {"examples": n_val}  # the eval_dataset
    assert summary["recorded_by"]["trainer"] == "Trainer"
    config = json.loads((run / files.CONFIG_FILE).read_text())
    # What the Trainer and PEFT told, and what nobody told (listed, not guessed)
    assert config["training"]["lr"] == 1e-2 and config["training"]["max_grad_norm"] == 0.5
    assert config["training"]["max_steps"] == STEPS and config["training"]["seed"] == SEED
    assert {k: config["lora"][k] for k in ("target", "r", "lora_alpha", "lora_dropout")} == {
        "target": "both", "r": 4, "lora_alpha": 8.0, "lora_dropout": 0.05}
    assert config["model"]["model"] == "tiny-random-llama" and config["data"]["dataset"] == "unknown"
    assert {"data.dataset", "data.max_length"} <= set(config["recorded_by"]["unknown_fields"])
    assert config["data"]["eval_samples"] == config["data"]["analysis_samples"] == n_val


@pytest.mark.slow  # reloads the model twice (analyze) and redraws every plot: ~30 s on the shared 2-core machine
def test_report_and_analyze_work_on_the_script_folder(plain_runs, capsys):
    _, run = plain_runs
    before = json.loads((run / files.SENSITIVITY).read_text())
    (run / files.REPORT_FILE).unlink()
    assert cli_main(["report", str(run)]) == 0
    page = (run / files.REPORT_FILE).read_text()
    assert "unknown (not recorded)" in page  # max_length was not told by the plain Trainer
    # analyze rebuilds the model from config.json (model_name) + final_model/; the ablation data is the script's
    assert cli_main(["analyze", str(run), "--ablation", "false"]) == 0
    after = json.loads((run / files.SENSITIVITY).read_text())
    assert after["rankings"]["grad_norm"] == before["rankings"]["grad_norm"]
    assert after["measures"]["update_magnitude"] == pytest.approx(before["measures"]["update_magnitude"], rel=1e-5)
    assert cli_main(["analyze", str(run), "--ablation", "true"]) == 2
    assert "held-out data is the script's" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_reads_the_script_folder_beside_a_lorasens_run(plain_runs, tmp_path):
    reference, run = plain_runs
    assert cli_main(["compare", str(reference), str(run), "--out", str(tmp_path / "cmp")]) == 0
    runs = {r["run"]: r for r in read_csv(tmp_path / "cmp" / "comparison_runs.csv")}
    assert runs[run.name]["dataset"] == ""  # unknown to lorasens: empty, not a guessed name
    assert runs[reference.name]["dataset"] == "synthetic"
    # same losses (same training), two configurations (the script's unknown settings are not pooled with known ones)
    assert float(runs[run.name]["final_train_loss"]) == pytest.approx(float(runs[reference.name]["final_train_loss"]),
                                                                      rel=1e-6)
    assert runs[run.name]["configuration"] != runs[reference.name]["configuration"]


def test_module_map_sees_through_peft_wrapped_layers(tiny_llama):
    from lorasens.model.module_map import build_module_map

    before = build_module_map(tiny_llama.model)
    model = get_peft_model(tiny_llama.model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    assert build_module_map(model.get_base_model()) == before  # lora_A / base_layer are not extra modules


class WeightSnapshots(TrainerCallback):
    """LoRA weights after every optimizer step, and which modules the optimizer held."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def _snapshot(self, model, step):
        self.weights[step] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._snapshot(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._snapshot(model, state.global_step)


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    reference = lorasens_train(out, "lorasens_train", phase_strategy="both->mlp->attn", phase_ends="2,4")
    script_dir = out / "script"
    snapshots = WeightSnapshots()
    trainer = sft_script(out, [SensitivityCallback(script_dir, model_name="tiny-random-llama"),
                               PhaseScheduleCallback("both->mlp->attn", [2, 4]), snapshots])
    return reference, script_dir, snapshots, trainer


@pytest.mark.slow
def test_sft_trainer_with_phases_writes_the_csvs_of_lorasens_train(sft_runs):
    reference, script_dir, _, _ = sft_runs
    assert_same_csvs(reference, script_dir)
    phases = json.loads((script_dir / files.PHASES).read_text())
    assert phases == json.loads((reference / files.PHASES).read_text())
    config = json.loads((script_dir / files.CONFIG_FILE).read_text())
    assert config["schedule"]["phase_strategy"] == "both->mlp->attn" and config["schedule"]["phase_ends"] == "2,4"
    assert config["data"]["max_length"] == SETTINGS["max_length"]  # SFTConfig tells it
    assert config["recorded_by"]["trainer"] == "SFTTrainer"
    assert (script_dir / files.SENSITIVITY).exists() and (script_dir / files.SUMMARY_FILE).exists()


@pytest.mark.slow
def test_phase_callback_freezes_bitwise_under_sft_trainer(sft_runs):
    _, _, snapshots, _ = sft_runs
    w = snapshots.weights
    assert sorted(w) == list(range(STEPS + 1))
    attn = {n for n in w[0] if any(f".{t}." in n for t in LLAMA_TYPES[:4])}
    mlp = set(w[0]) - attn
    # phase 1 (steps 1-2) trains both, phase 2 (steps 3-4) only MLP, phase 3 (steps 5-6) only attention
    for names_frozen, names_trained, (start, end) in ((attn, mlp, (2, 4)), (mlp, attn, (4, 6))):
        for n in names_frozen:
            assert torch.equal(w[start][n], w[end][n]), n  # bitwise, despite weight_decay 0.1
        changed = [n for n in names_trained if "lora_B" in n and not torch.equal(w[start][n], w[end][n])]
        assert len(changed) == len([n for n in names_trained if "lora_B" in n])


# ---------------------------------------------------------------------------------------------------------------
# Clear refusals


def test_model_without_lora_is_refused(tmp_path):
    loaded = load_model("tiny-random-llama", seed=0)
    ids = [[5, 6, 7, 8, 9]] * 4
    data = Dataset.from_list([{"input_ids": i, "labels": i} for i in ids])
    for callback, who in ((SensitivityCallback(tmp_path / "run"), "SensitivityCallback"),
                          (PhaseScheduleCallback("attn->mlp", "1"), "PhaseScheduleCallback")):
        trainer = Trainer(model=loaded.model, args=TrainingArguments(**{**common_args(tmp_path), "max_steps": 2}),
                          train_dataset=data, callbacks=[callback])
        with pytest.raises(UserError, match=f"{who}: the model is a LlamaForCausalLM, not a PEFT model with LoRA"):
            trainer.train()


def test_optimizer_built_without_the_scheduled_parameters_is_refused(tmp_path):
    model, tokenizer, train, _ = user_model_and_data()
    # Built over the attention LoRA only (e.g. MLP LoRA frozen before the optimizer existed): MLP could never train.
    params = [p for n, p in model.named_parameters() if "lora_" in n and "mlp" not in n]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    trainer = Trainer(model=model, args=TrainingArguments(**common_args(tmp_path)), train_dataset=train,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
                      optimizers=(optimizer, None), callbacks=[PhaseScheduleCallback("attn->mlp", [0.5])])
    with pytest.raises(UserError, match=r"optimizer was built without the LoRA parameters of 12 scheduled module\(s\) "
                                        r"\(L0.gate_proj"):
        trainer.train()


def test_bad_schedule_and_ends_are_refused_when_built():
    with pytest.raises(UserError, match="bad layer range 'a-b'"):
        PhaseScheduleCallback("attn@a-b->mlp", "3")
    with pytest.raises(UserError, match="phase_ends must be"):
        PhaseScheduleCallback("attn->mlp", ["3"])


def test_trainer_is_found_on_the_stack_only_if_it_holds_the_callback():
    from lorasens.experiment.script_callback import find_trainer

    callback = SensitivityCallback("unused")
    assert find_trainer(callback) is None  # no Trainer event is running
