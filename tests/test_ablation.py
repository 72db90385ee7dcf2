"""The ablation engine: cached layer replay equals whole passes, per-example results, exact heads, fallbacks."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorasens.analysis.ablation import (
    lora_switched_off,
    run_ablation,
    validation_batches,
)
from lorasens.model.loading import build_tiny_random_llama, byte_level_tokenizer
from lorasens.model.lora import apply_lora, lora_parameters
from lorasens.model.module_map import build_module_map


def with_trained_lora(model, seed=0, modules=None):
    """PEFT LoRA on every module-map entry (or `modules`), with B drawn at random as if trained."""
    module_map = build_module_map(model)
    torch.manual_seed(seed)
    peft = apply_lora(model, modules or module_map.modules, 4, 8.0, 0.0)
    lora = lora_parameters(peft, module_map)
    with torch.no_grad():
        for lp in lora:
            lp.B.normal_(0, 0.3)
    return peft.eval(), module_map, lora


def text_features(tokenizer, n=7, vocab=None):
    out = []
    for i in range(n):
        ids = tokenizer(f"The Eagle is a pub number {i} near the river, rated {i % 3} stars. " * (1 + i % 3))["input_ids"]
        ids = ids[: 12 + 5 * i]
        if vocab is not None:
            ids = [t % vocab for t in ids]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * (4 + i) + ids[4 + i:]})
    return out


def reference_sums(model, features, sets):
    """Per-set, per-example loss sums from a plain forward of the whole model, one example at a time."""
    sums = torch.zeros(len(sets), len(features), dtype=torch.float64)
    with torch.no_grad():
        for s_index, s in enumerate(sets):
            with lora_switched_off(model, s.modules):
                for e, f in enumerate(features):
                    logits = model(input_ids=torch.tensor([f["input_ids"]]), use_cache=False).logits[0, :-1]
                    labels = torch.tensor(f["labels"][1:])
                    sums[s_index, e] = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").double()
    return sums


@pytest.mark.slow
def test_cached_deltas_equal_whole_decoder_passes_on_tiny_llama():
    model, module_map, lora = with_trained_lora(build_tiny_random_llama(seed=0).model)
    tokenizer = byte_level_tokenizer()
    feats = text_features(tokenizer)
    batches = validation_batches(feats, 3, tokenizer.pad_token_id, "cpu")
    singles = [lora[0].module, lora[9].module, lora[20].module, lora[27].module]
    cached = run_ablation(model, lora, batches, singles, layers_path=module_map.layers_path)
    full = run_ablation(model, lora, batches, singles, method="decoder")
    assert cached.method == "cached" and full.method == "decoder"
    # The shortcut pays off: layer and single-module sets after layer 0 replay fewer layers, yet give the same numbers.
    assert [s.first_layer for s in cached.sets if s.kind == "layer"] == [0, 1, 2, 3]
    for a, b in zip(cached.rows(), full.rows()):
        assert (a.kind, a.name, a.num_modules) == (b.kind, b.name, b.num_modules)
        assert a.delta_loss == pytest.approx(b.delta_loss, abs=1e-6) and a.loss == pytest.approx(b.loss, abs=1e-6)
    assert torch.equal(cached.token_counts, full.token_counts)
    assert torch.allclose(cached.loss_sums, full.loss_sums, rtol=1e-6, atol=1e-6)
    # The sets really differ from each other (a broken switch would make every delta 0).
    deltas = [r.delta_loss for r in cached.rows()]
    assert deltas[0] == 0.0 and min(abs(d) for d in deltas[1:]) > 1e-4


@pytest.mark.slow
def test_per_example_results_match_one_example_forwards_and_aggregate_to_the_rows():
    model, module_map, lora = with_trained_lora(build_tiny_random_llama(seed=1).model, seed=1)
    tokenizer = byte_level_tokenizer()
    feats = text_features(tokenizer, n=5)
    result = run_ablation(model, lora, validation_batches(feats, 2, tokenizer.pad_token_id, "cpu"), [lora[3].module])
    expected_counts = [sum(1 for t in f["labels"][1:] if t != -100) for f in feats]
    assert result.token_counts.tolist() == expected_counts  # in the order of the features, not the sorted one
    assert torch.allclose(result.loss_sums, reference_sums(model, feats, result.sets), rtol=1e-5)
    means = result.loss_sums.sum(1) / result.token_counts.sum()
    assert [r.loss for r in result.rows()] == pytest.approx(means.tolist(), abs=1e-12)
    assert result.rows()[0].delta_loss == 0.0 and result.wall_time_s > 0


@pytest.mark.slow
def test_cached_deltas_equal_whole_decoder_passes_on_stories260k(stories260k):
    base = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    model, module_map, lora = with_trained_lora(base)
    feats = text_features(tokenizer, n=6)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = validation_batches(feats, 4, pad, "cpu")
    singles = [lora[i].module for i in (1, 8, 15, len(lora) - 1)]
    full = run_ablation(model, lora, batches, singles, method="decoder")
    # Through PEFT's branch the replay is the same arithmetic (1e-6); folded, W x + s B A x becomes (W + s B A) x,
    # the same to fp32 rounding (1e-5 on losses of several nats).
    for fold, tolerance in ((False, 1e-6), (True, 1e-5)):
        cached = run_ablation(model, lora, batches, singles, fold=fold)
        assert cached.method == "cached" and ("LoRA folded" in cached.method_reason) == fold
        for a, b in zip(cached.rows(), full.rows()):
            assert a.delta_loss == pytest.approx(b.delta_loss, abs=tolerance)
    assert max(abs(r.delta_loss) for r in cached.rows()) > 1e-3


def tiny_gemma2(softcap: float | None):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                          sliding_window=8, final_logit_softcapping=softcap, attn_logit_softcapping=50.0,
                          pad_token_id=2, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return Gemma2ForCausalLM(config)


@pytest.mark.slow
def test_gemma2_softcapped_logits_give_the_loss_of_a_whole_forward():
    # A small cap changes the loss a lot (tanh saturates), so a head without the softcap cannot pass this test.
    model, module_map, lora = with_trained_lora(tiny_gemma2(softcap=0.5))
    tokenizer = byte_level_tokenizer()
    feats = text_features(tokenizer, n=5)  # some longer than the sliding window of 8: both mask kinds are used
    singles = [lora[2].module, lora[12].module]
    result = run_ablation(model, lora, validation_batches(feats, 2, tokenizer.pad_token_id, "cpu"), singles)
    assert result.method == "cached"
    assert torch.allclose(result.loss_sums, reference_sums(model, feats, result.sets), rtol=1e-5)
    # The cap matters here: without it the loss would be far from this.
    with torch.no_grad():
        plain = model.get_base_model().lm_head(model.get_base_model().model(
            input_ids=torch.tensor([feats[0]["input_ids"]])).last_hidden_state)[0, :-1]
        capped = model(input_ids=torch.tensor([feats[0]["input_ids"]]), use_cache=False).logits[0, :-1]
    assert (plain - capped).abs().max() > 0.1


def test_gpt2_layers_replay_with_their_absolute_positions():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=259, n_embd=32, n_layer=3, n_head=4, n_positions=128))
    model, module_map, lora = with_trained_lora(base)
    tokenizer = byte_level_tokenizer()
    feats = text_features(tokenizer, n=4)
    result = run_ablation(model, lora, validation_batches(feats, 2, tokenizer.pad_token_id, "cpu"), [lora[5].module])
    assert result.method == "cached" and module_map.layers_path == "transformer.h"
    assert torch.allclose(result.loss_sums, reference_sums(model, feats, result.sets), rtol=1e-5)


@pytest.mark.slow
def test_an_unknown_logit_transform_falls_back_to_whole_model_passes(caplog):
    from transformers import LlamaForCausalLM

    class DoubledLogitsLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    tiny = build_tiny_random_llama(seed=0).model
    odd = DoubledLogitsLlama(tiny.config)
    odd.load_state_dict(tiny.state_dict())
    model, module_map, lora = with_trained_lora(odd)
    tokenizer = byte_level_tokenizer()
    feats = text_features(tokenizer, n=4)
    with caplog.at_level(logging.WARNING, logger="lorasens.analysis.ablation"):
        result = run_ablation(model, lora, validation_batches(feats, 2, tokenizer.pad_token_id, "cpu"), [lora[0].module])
    assert result.method == "model" and "shortcut" in result.method_reason
    assert "whole-model passes" in caplog.text
    assert torch.allclose(result.loss_sums, reference_sums(model, feats, result.sets), rtol=1e-5)
    with pytest.raises(RuntimeError, match="not exact"):
        run_ablation(model, lora, validation_batches(feats, 2, tokenizer.pad_token_id, "cpu"), [], method="cached")


@pytest.mark.slow
def test_packed_batches_give_the_per_example_losses_of_padded_ones():
    model, module_map, lora = with_trained_lora(build_tiny_random_llama(seed=0).model)
    tokenizer = byte_level_tokenizer()
    feats = text_features(tokenizer, n=20)
    padded = validation_batches(feats, 3, tokenizer.pad_token_id, "cpu")
    packed = validation_batches(feats, None, tokenizer.pad_token_id, "cpu", max_tokens=600, packing=True)
    # Rows of <= 256 tokens holding several examples each, two rows per batch, every example exactly once, and
    # less padding than one example per row.
    width = packed[0].labels.shape[1]
    assert max(len(f["input_ids"]) for f in feats) <= width <= 256
    assert len(packed) > 1 and all(b.labels.shape == (2, width) or b is packed[-1] for b in packed)
    per_row = [len(set(row.tolist()) - {-1}) for b in packed for row in b.example]
    assert max(per_row) >= 3 and sum(per_row) == 20
    assert sum(b.num_tokens for b in packed) < sum(b.num_tokens for b in padded)
    a = run_ablation(model, lora, padded, [lora[4].module])
    b = run_ablation(model, lora, packed, [lora[4].module])
    assert b.method == "cached"
    assert torch.equal(a.token_counts, b.token_counts)
    assert torch.allclose(a.loss_sums, b.loss_sums, rtol=1e-5)
    assert torch.allclose(b.loss_sums[:3], reference_sums(model, feats, b.sets[:3]), rtol=1e-5)  # on, off, attn off


def test_token_budget_groups_examples():
    tokenizer = byte_level_tokenizer()
    feats = text_features(tokenizer, n=7)
    batches = validation_batches(feats, None, tokenizer.pad_token_id, "cpu", max_tokens=100)
    assert all(b.num_tokens <= 100 or b.labels.shape[0] == 1 for b in batches)
    assert sorted(int(e) for b in batches for e in b.example.unique() if e >= 0) == list(range(7))
    assert len(batches) < 7  # several examples per batch where they fit


@pytest.mark.slow
def test_sets_sharing_a_prefix_share_its_layers_and_keep_the_plain_deltas():
    """Every single module as well as the groups, layers and types: sets that switch off the same modules in layers
    0..L compute those layers once (112 layer runs instead of 120 for the per-set replay, 172 for whole passes),
    and every delta equals the whole-decoder one to 1e-5."""
    from lorasens.analysis.ablation import ablation_sets, count_layer_runs, layer_plan

    model, module_map, lora = with_trained_lora(build_tiny_random_llama(seed=0).model)
    tokenizer = byte_level_tokenizer()
    batches = validation_batches(text_features(tokenizer), 4, tokenizer.pad_token_id, "cpu")
    singles = [lp.module for lp in lora]
    sets = ablation_sets(lora, singles)
    per_set_replay = sum(4 - s.first_layer for s in sets if s.modules)
    assert (len(sets), per_set_replay, count_layer_runs(layer_plan(sets, 4))) == (43, 120, 112)
    layers = model.get_base_model().get_submodule(module_map.layers_path)
    calls = []
    handles = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in layers]
    try:
        cached = run_ablation(model, lora, batches, singles, layers_path=module_map.layers_path)
    finally:
        for h in handles:
            h.remove()
    probe = 4 + 4 + 4  # the exactness probe: capture, replay and a plain forward on two rows of the first batch
    assert cached.method == "cached" and len(calls) == probe + len(batches) * (4 + 112)
    full = run_ablation(model, lora, batches, singles, method="decoder")
    for a, b in zip(cached.rows(), full.rows()):
        assert a.name == b.name and a.delta_loss == pytest.approx(b.delta_loss, abs=1e-5)
    assert torch.allclose(cached.loss_sums, full.loss_sums, rtol=1e-6, atol=1e-6)
    assert min(abs(r.delta_loss) for r in cached.rows()[1:]) > 1e-5  # every set changes the loss
