"""The LM head at the labelled positions only: the model's own loss, gradients, validation loss and training."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from lorasens.config import build_config
from lorasens.experiment.run import run_experiment
from lorasens.model.loading import build_tiny_random_llama, byte_level_tokenizer
from lorasens.training.decision import SpeedupDecision
from lorasens.training.labelled_head import (
    LabelledHeadCollator,
    decide_labelled_head,
    labelled_head_loss,
    target_mask,
)
from lorasens.training.trainer import PackedCollator, build_trainer, padded_collator, target_token_losses


def features(tokenizer, n=5):
    out = []
    for i in range(n):
        ids = tokenizer(f"name[The Eagle {i}], food[French] | The Eagle {i} serves French food." * (1 + i % 2))["input_ids"]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * (20 + i) + ids[20 + i:]})
    return out


def lora_model():
    torch.manual_seed(0)
    loaded = build_tiny_random_llama(seed=0)
    model = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                    init_lora_weights=False))
    return model, loaded.tokenizer


def loss_and_grads(model, loss_fn):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("collate", ["packed", "padded"])
def test_kept_logits_give_the_models_loss_and_lora_gradients(collate):
    model, tokenizer = lora_model()
    feats = features(tokenizer)
    batch = (PackedCollator() if collate == "packed" else padded_collator(tokenizer))(feats)
    targets = sum(sum(1 for t in f["labels"][1:] if t != -100) for f in feats)
    full = loss_and_grads(model, lambda: model(**batch).loss)
    kept_batch = LabelledHeadCollator(lambda _: batch)(feats)
    assert int(kept_batch["logits_to_keep"].sum()) == targets
    labels = kept_batch.pop("labels")
    outputs = model(**kept_batch)
    assert outputs.logits.shape == (targets, model.config.vocab_size)
    kept = loss_and_grads(model, lambda: labelled_head_loss(model(**kept_batch), labels))
    assert kept[0] == pytest.approx(full[0], abs=1e-6)
    for g, ref in zip(kept[1], full[1]):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)
    # With the Trainer's count of the accumulated batch's targets (here twice this batch's) the loss halves.
    with torch.no_grad():
        assert float(labelled_head_loss(model(**kept_batch), labels, num_items_in_batch=2 * targets)) == \
            pytest.approx(full[0] / 2, abs=1e-6)


def test_target_mask_marks_the_positions_before_each_target():
    labels = torch.tensor([[-100, -100, 5, 6, -100, 7], [-100, 8, -100, -100, -100, -100]])
    assert target_mask(labels).tolist() == [[False, True, True, False, True, False],
                                            [True, False, False, False, False, False]]


def test_validation_losses_per_row_are_the_same_from_kept_logits():
    model, tokenizer = lora_model()
    feats = features(tokenizer)
    batch = padded_collator(tokenizer)(feats)
    with torch.no_grad():
        full = target_token_losses(model(**batch).logits, batch["labels"])
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        kept = target_token_losses(model(**inputs, logits_to_keep=target_mask(batch["labels"])).logits,
                                   batch["labels"])
    assert kept.shape == (len(feats), 2)
    torch.testing.assert_close(kept, full, rtol=1e-6, atol=1e-5)
    assert kept[:, 1].tolist() == [float(sum(1 for t in f["labels"][1:] if t != -100)) for f in feats]


def test_probe_keeps_the_full_head_for_a_model_that_ignores_logits_to_keep():
    class FullHead(LlamaForCausalLM):  # an architecture that always projects every position
        def forward(self, *args, logits_to_keep=0, **kwargs):
            return super().forward(*args, **kwargs)

    tiny = build_tiny_random_llama(seed=0).model
    model = FullHead(tiny.config)
    model.load_state_dict(tiny.state_dict())
    tokenizer = byte_level_tokenizer()
    batch = PackedCollator()(features(tokenizer, 2))
    decision = decide_labelled_head(model, batch)
    assert not decision.enabled and "logits" in decision.reason
    assert decide_labelled_head(tiny, batch).enabled


BASE = dict(model="tiny-random-llama", dataset="synthetic", r=4, batch_size=4, max_length=128, eval_steps=2,
            evaluate=False, train_samples=32, eval_samples=8, lora_dropout=0.0, lr=1e-2, max_steps=4,
            ablation=False)


def test_training_with_the_labelled_head_follows_the_full_heads_losses(tmp_path):
    """The Trainer with kept logits (the default) and with the full head: the same training and validation losses
    step by step, and the same trained LoRA weights."""
    runs = {}
    for enabled in (True, False):
        cfg = build_config(cli_overrides={**BASE, "output_dir": str(tmp_path / str(enabled))})
        loaded = build_tiny_random_llama(seed=0)
        torch.manual_seed(0)
        model = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
        feats = features(loaded.tokenizer, 16)
        head = None if enabled else SpeedupDecision(False, "the comparison")
        trainer = build_trainer(cfg, tmp_path / str(enabled), model, loaded.tokenizer, feats, feats[:6], [],
                                head=head)
        assert (trainer.compute_loss_func is labelled_head_loss) == enabled
        trainer.train()
        history = trainer.state.log_history
        runs[enabled] = ([r["loss"] for r in history if "loss" in r], [r["eval_loss"] for r in history if "eval_loss" in r],
                         [p.detach().clone() for p in model.parameters() if p.requires_grad])
    (train_a, eval_a, weights_a), (train_b, eval_b, weights_b) = runs[True], runs[False]
    assert len(train_a) == 4 and len(eval_a) == 2
    assert train_a == pytest.approx(train_b, rel=1e-5) and eval_a == pytest.approx(eval_b, rel=1e-5)
    for a, b in zip(weights_a, weights_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_run_records_the_head_decision(tmp_path):
    cfg = build_config(cli_overrides={**BASE, "max_steps": 2, "output_dir": str(tmp_path / "run")})
    summary = json.loads((run_experiment(cfg).run_dir / "summary.json").read_text())
    assert summary["labelled_head"]["enabled"] is True and "exact" in summary["labelled_head"]["reason"]
