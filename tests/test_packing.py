"""Padding-free batches: packed loss = padded loss, the use_cache trap, the probe's fallback, identical analysis."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, TrainerCallback

from lorasens.config import build_config
from lorasens.experiment.run import run_experiment
from lorasens.model.loading import build_tiny_random_llama, byte_level_tokenizer
from lorasens.training.trainer import PackedCollator, decide_packing, padded_collator


def features(tokenizer, n=6):
    out = []
    for i in range(n):
        ids = tokenizer(f"name[The Eagle {i}], food[French] | The Eagle {i} serves French food." * (1 + i % 2))["input_ids"]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * (8 + i) + ids[8 + i:]})
    return out


def losses(model, tokenizer, feats):
    """(padded loss, packed loss) of one batch with every example."""
    with torch.no_grad():
        padded = model(**padded_collator(tokenizer)(feats)).loss
        packed = model(**PackedCollator()(feats)).loss
    return float(padded), float(packed)


def test_packed_loss_equals_padded_loss_on_llama_and_gpt2():
    tokenizer = byte_level_tokenizer()
    feats = features(tokenizer)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=259, n_embd=32, n_layer=2, n_head=4, n_positions=256)).eval()
    for model in (build_tiny_random_llama(seed=0).model.eval(), gpt2):
        padded, packed = losses(model, tokenizer, feats)
        assert packed == pytest.approx(padded, abs=1e-5)
        decision = decide_packing(model, tokenizer, feats, True, 4)
        assert decision.enabled and "exact" in decision.reason
    batch = PackedCollator()(feats)
    assert batch["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in feats)) and batch["use_cache"] is False
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [0] + list(torch.tensor([len(f["input_ids"]) for f in feats]).cumsum(0)[:-1].tolist())
    assert (batch["labels"][0, starts] == -100).all()


def test_the_kv_cache_makes_packed_examples_attend_to_each_other():
    """Why `PackedCollator` passes use_cache=False: with the default cache, transformers 5.24 ignores the packed
    position_ids when building the mask, and the loss silently changes. If this starts failing, transformers has
    fixed it; the flag stays harmless."""
    model = build_tiny_random_llama(seed=0).model.eval()
    tokenizer = byte_level_tokenizer()
    feats = features(tokenizer)
    batch = PackedCollator()(feats)
    del batch["use_cache"]
    assert model.config.use_cache
    with torch.no_grad():
        with_cache = float(model(**batch).loss)
    padded, _ = losses(model, tokenizer, feats)
    assert abs(with_cache - padded) > 1e-3


def test_probe_falls_back_to_padding_when_attention_ignores_packed_positions(caplog):
    class PositionBlindLlama(LlamaForCausalLM):  # an architecture whose attention cannot separate packed examples
        def forward(self, *args, position_ids=None, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
                    max_length_k=None, **kwargs):
            return super().forward(*args, **kwargs)

    tiny = build_tiny_random_llama(seed=0).model
    model = PositionBlindLlama(tiny.config)
    model.load_state_dict(tiny.state_dict())
    tokenizer = byte_level_tokenizer()
    with caplog.at_level(logging.WARNING, logger="lorasens.training.trainer"):
        decision = decide_packing(model, tokenizer, features(tokenizer), True, 4)
    assert not decision.enabled and "padding instead" in decision.reason
    assert "packing off" in caplog.text
    assert decide_packing(model, tokenizer, features(tokenizer), False, 4).reason == "--packing false"


BASE = dict(model="tiny-random-llama", dataset="synthetic", r=4, batch_size=4, max_length=128, eval_steps=2,
            evaluate=False, train_samples=32, eval_samples=8, lora_dropout=0.0, lr=1e-2, max_steps=3,
            ablation_max_single=3)


class CacheSpy(TrainerCallback):
    """Records, for every training forward, whether a decoder layer was handed a KV cache."""

    def __init__(self):
        self.caches: list[object] = []
        self.calls = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layer = model.get_base_model().model.layers[0]

        def hook(module, args, kwargs):
            if module.training:
                self.calls += 1
                self.caches.append(kwargs.get("cache", kwargs.get("past_key_values")))

        self.handle = layer.register_forward_pre_hook(hook, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.handle.remove()


def table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def assert_same_numbers(a: list[dict], b: list[dict], rel: float):
    assert len(a) == len(b) and a
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            try:
                va, vb = float(ra[key]), float(rb[key])
            except ValueError:
                assert ra[key] == rb[key]
            else:
                assert va == pytest.approx(vb, rel=rel, abs=1e-9), (key, ra, rb)


@pytest.mark.slow
def test_packed_and_padded_runs_record_the_same_gradients_and_analysis(tmp_path):
    from lorasens.analysis.post import analyze_after_training

    spy = CacheSpy()
    runs = {}
    for packing in (True, False):
        cfg = build_config(cli_overrides={**BASE, "packing": packing, "output_dir": str(tmp_path),
                                          "experiment_name": f"packing_{packing}"})
        # The report (another area) is not under test here.
        summary = run_experiment(cfg, callbacks=[spy] if packing else [], after_training=(analyze_after_training,)).summary
        runs[packing] = (tmp_path / f"packing_{packing}", summary)
    (packed, s_packed), (padded, s_padded) = runs[True], runs[False]
    assert s_packed["packing"]["enabled"] and not s_padded["packing"]["enabled"]
    assert s_packed["ablation_packed"] and not s_padded["ablation_packed"]
    # The use_cache trap: no training forward with packing on was handed a KV cache.
    assert spy.calls >= 3 and all(c is None for c in spy.caches)
    for name in ("gradient_analysis.module_norms.csv", "gradient_analysis.group_norms.csv", "importance.csv",
                 "update_magnitude.csv", "sensitivity_ablation.csv"):
        assert_same_numbers(table(packed / name), table(padded / name), rel=1e-4)
    log_a = [json.loads(line) for line in (packed / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (padded / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log_a] == pytest.approx([r["loss"] for r in log_b], rel=1e-4)
    # Padded batches count non-padding tokens; packed batches have none: the same counts.
    assert [r["tokens"] for r in log_a] == [r["tokens"] for r in log_b]
    assert s_packed["best_eval_loss"] == pytest.approx(s_padded["best_eval_loss"], rel=1e-4)


def test_group_by_length_gives_the_trainer_a_length_grouped_sampler(tmp_path):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from lorasens.training.trainer import build_trainer

    loaded = build_tiny_random_llama(seed=0)
    feats = features(loaded.tokenizer, n=12)
    samplers = {}
    for grouped in (False, True):
        cfg = build_config(cli_overrides={**BASE, "group_by_length": grouped, "eval_steps": 0, "output_dir": str(tmp_path)})
        trainer = build_trainer(cfg, tmp_path, loaded.model, loaded.tokenizer, feats, None, [])
        samplers[grouped] = trainer._get_train_sampler()
        assert trainer.args.include_num_input_tokens_seen == "all"  # packing on: no padding to leave out
    assert isinstance(samplers[True], LengthGroupedSampler) and not isinstance(samplers[False], LengthGroupedSampler)
    assert samplers[True].lengths == [len(f["input_ids"]) for f in feats]


def test_packed_samsum_batches_give_the_padded_loss_and_gradients_with_attention_per_example():
    """SAMSum dialogues (long, very different lengths) in one packed row: the per-example SDPA
    (`lorasens.training.packing`) gives the loss and LoRA gradients of the padded batch, as the block-diagonal mask
    over the whole row does."""
    from peft import LoraConfig, get_peft_model

    from lorasens.data.features import build_features
    from lorasens.data.registry import load_examples
    from lorasens.training.packing import SEGMENT_ATTENTION
    from lorasens.training.trainer import packed_collator

    loaded = build_tiny_random_llama(seed=0)
    fixtures = Path(__file__).parent / "fixtures" / "samsum"
    examples = [ex for split in ("train", "validation", "test") for ex in load_examples("samsum", split, fixtures)]
    feats, _ = build_features(examples, loaded.tokenizer, 768)
    lengths = [len(f["input_ids"]) for f in feats]
    assert len(feats) >= 3 and max(lengths) > 1.5 * min(lengths)
    torch.manual_seed(0)
    model = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    padded = loss_and_grads(padded_collator(loaded.tokenizer)(feats))
    masked = loss_and_grads(packed_collator(model, segments=False)(feats))  # the whole-row mask
    assert model.config._attn_implementation == "sdpa"
    collate = packed_collator(model)
    assert model.config._attn_implementation == SEGMENT_ATTENTION
    batch = collate(feats)
    assert batch["cu_seq_lens_q"].tolist() == [0] + torch.tensor(lengths).cumsum(0).tolist()
    segmented = loss_and_grads(batch)
    for loss, grads in (masked, segmented):
        assert loss == pytest.approx(padded[0], abs=1e-5)
        for g, ref in zip(grads, padded[1]):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    # Padded batches still go through SDPA's mask after the switch: the same loss as before it.
    assert loss_and_grads(padded_collator(loaded.tokenizer)(feats))[0] == pytest.approx(padded[0], abs=1e-6)
