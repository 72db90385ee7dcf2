"""Batched greedy (or beam) generation and label log-likelihoods for evaluation.

Prompts are encoded exactly as for training (`encode_prompt`: BOS + prompt tokens), cut from the left when longer
than `max_prompt_tokens` (keeping BOS), sorted by length so that a batch holds prompts of similar length, and
left-padded: every row's last prompt token sits in the last column, so one `generate` call with the KV cache
extends all rows together, and the attention mask (and the position ids transformers derives from it) make each
row see only its own tokens. Results are returned in the input order.

Stopping: a row stops at EOS or at the first of the dataset's stop strings (checked on its decoded continuation);
the batch stops when every row has. Predictions are cut at the stop string. With beam search only EOS and
`max_new_tokens` stop the search (per-row stop strings do not compose with beam bookkeeping); the cut is the same.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from lorasens.data.features import encode_prompt

logger = logging.getLogger(__name__)


def encode_prompts(tokenizer, prompts: Sequence[str | Sequence[int]], max_prompt_tokens: int | None) -> list[list[int]]:
    """Token ids of each prompt; a prompt given as token ids (a chat prompt, `features.prompt_input`) is kept."""
    encoded = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            keep_head = 1 if tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id] else 0
            ids = ids[:keep_head] + ids[len(ids) - (max_prompt_tokens - keep_head) :]
        encoded.append(ids)
    return encoded


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), with padding on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop_strings if s and s in text), default=len(text))
    return text[:cut].strip()


class StopOnStrings:
    """Per-row stopping criterion: True for rows whose continuation contains a stop string."""

    def __init__(self, tokenizer, prompt_width: int, stop_strings: Sequence[str]):
        self.tokenizer, self.prompt_width, self.stop_strings = tokenizer, prompt_width, tuple(stop_strings)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop_strings) for t in texts], device=input_ids.device)


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, silent in logs and CI.
    return tqdm(total=total, desc=desc, unit="ex", disable=None, leave=False)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    num_beams: int = 1,
    stop_strings: Sequence[str] = ("\n",),
    max_prompt_tokens: int | None = None,
    desc: str = "generate",
) -> list[str]:
    """Continuations of `prompts` (greedy unless num_beams > 1), cut at the first stop string."""
    from transformers import StoppingCriteriaList

    encoded = encode_prompts(tokenizer, prompts, max_prompt_tokens)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with _progress(len(encoded), desc) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            ids, mask = left_pad([encoded[i] for i in batch], pad_id)
            width = ids.shape[1]
            stopping = StoppingCriteriaList([StopOnStrings(tokenizer, width, stop_strings)]) if num_beams == 1 and stop_strings else None
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=num_beams, use_cache=True, pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id, stopping_criteria=stopping,
                temperature=None, top_p=None, top_k=None,
            )
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            for i, text in zip(batch, texts):
                outputs[i] = cut_at_stop(text, stop_strings)
            bar.update(len(batch))
    return outputs


@torch.inference_mode()
def label_loglikelihoods(
    model, tokenizer, prompts: Sequence[str | Sequence[int]], labels: Sequence[str], *, batch_size: int = 16,
    max_prompt_tokens: int | None = None, desc: str = "score labels",
) -> list[list[float]]:
    """log p(label | prompt) summed over the label's tokens, for every prompt and label: (N, len(labels)).

    Each label is encoded as the training target is (a leading space), without EOS.
    """
    encoded = encode_prompts(tokenizer, prompts, max_prompt_tokens)
    label_ids = [tokenizer(" " + label, add_special_tokens=False)["input_ids"] for label in labels]
    pairs = [(p, k) for p in range(len(encoded)) for k in range(len(labels))]
    pairs.sort(key=lambda pk: -(len(encoded[pk[0]]) + len(label_ids[pk[1]])))
    scores = [[0.0] * len(labels) for _ in encoded]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with _progress(len(pairs), desc) as bar:
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            ids, mask = left_pad([encoded[p] + label_ids[k] for p, k in batch], pad_id)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # (B, T, V)
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t+1
            width = ids.shape[1]
            for row, (p, k) in enumerate(batch):
                n = len(label_ids[k])
                targets = ids[row, width - n :].to(device)
                picked = logprobs[row, width - n - 1 : width - 1].gather(-1, targets[:, None])
                scores[p][k] = float(picked.sum())
            bar.update(len(batch))
    return scores
