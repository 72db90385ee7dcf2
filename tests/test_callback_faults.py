"""The callbacks in a plain Trainer script never kill the training they observe, and never write a recommendation
from a diverged run: a tokenizer kept only in the data collator, and a loss that becomes NaN (lr 1e30)."""

from __future__ import annotations

import csv
import json
import math

import pytest
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from lorasens import SensitivityCallback
from lorasens.rundir import files

from test_callbacks import STEPS, common_args, user_model_and_data


def collator_only_script(out, lr: float) -> Trainer:
    """The README's script shape: the tokenizer is in the collator only (no processing_class)."""
    model, tokenizer, train, validation = user_model_and_data()
    train = train.remove_columns([c for c in train.column_names if c not in ("input_ids", "attention_mask")])
    args = TrainingArguments(**{**common_args(out), "learning_rate": lr})
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      callbacks=[SensitivityCallback(output_dir=out / "run")])
    trainer.train()
    return trainer


@pytest.mark.slow
def test_tokenizer_only_in_the_collator_trains_to_the_end_with_the_csvs(tmp_path):
    trainer = collator_only_script(tmp_path, lr=1e-2)
    run = tmp_path / "run"
    assert trainer.state.global_step == STEPS
    rows = list(csv.DictReader((run / files.MODULE_NORMS).open()))
    assert {int(r["step"]) for r in rows} == set(range(1, STEPS + 1))
    for name in (files.GROUP_NORMS, files.LAYER_NORMS, files.IMPORTANCE, files.UPDATE_MAGNITUDE):
        assert (run / name).stat().st_size > 0
    summary = json.loads((run / files.SUMMARY_FILE).read_text())
    assert summary["steps"] == STEPS and "diverged" not in summary
    # the tokenizer was found in the collator, so the ablation ran on the eval dataset
    assert summary["analysis_data"]["examples"] > 0
    assert (run / files.RECOMMENDED_CONFIG).is_file()


@pytest.mark.slow
def test_diverging_loss_is_recorded_null_and_the_run_marked_diverged(tmp_path):
    trainer = collator_only_script(tmp_path, lr=1e30)
    run = tmp_path / "run"
    assert trainer.state.global_step == STEPS  # the callback marks the run; it does not stop the user's training
    log = [json.loads(line) for line in (run / files.TRAIN_LOG).read_text().splitlines()]
    assert len(log) == STEPS
    assert any(r["loss"] is None for r in log)
    assert all(r["loss"] is None or (math.isfinite(r["loss"]) and r["loss"] != 0.0) for r in log)
    assert all("loss" in r["non_finite"] for r in log if r["loss"] is None)
    summary = json.loads((run / files.SUMMARY_FILE).read_text())
    assert summary["diverged"]["step"] >= 1 and summary["diverged"]["reason"]
    assert summary["final_train_loss"] is None
    assert not (run / files.RECOMMENDED_CONFIG).exists()
    page = (run / files.REPORT_FILE).read_text()
    assert "DIVERGED at step" in page
    assert page.index("training diverged at step") < page.index('<section id="config"')
