"""Examples -> training features: prompt + target tokens, with the loss on the target tokens only.

Truncation never silently drops the target: when prompt + target is too long the prompt is cut from the left
(keeping BOS and the end of the prompt, which holds the answer cue); an example whose target alone does not fit
is dropped. Both counts are returned and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lorasens.data.registry import Example

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # labels with this value are left out of the loss (PyTorch/transformers convention)


@dataclass
class FeatureStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"examples": self.examples, "truncated": self.truncated, "dropped": self.dropped}


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and getattr(tokenizer, "add_bos_token", True) is not False:
        ids = [bos] + ids
    return ids


def encode_target(tokenizer, target: str) -> list[int]:
    return tokenizer(" " + target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def build_features(examples: list[Example], tokenizer, max_length: int, name: str = "train") -> tuple[list[dict], FeatureStats]:
    stats = FeatureStats()
    features = []
    for ex in examples:
        prompt = encode_prompt(tokenizer, ex.prompt)
        target = encode_target(tokenizer, ex.target)
        if len(target) >= max_length:
            stats.dropped += 1
            continue
        room = max_length - len(target)
        if len(prompt) > room:
            stats.truncated += 1
            keep_head = 1 if tokenizer.bos_token_id is not None and prompt[:1] == [tokenizer.bos_token_id] else 0
            prompt = prompt[:keep_head] + prompt[len(prompt) - (room - keep_head) :]
        ids = prompt + target
        features.append(
            {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * len(prompt) + target}
        )
        stats.examples += 1
    if stats.truncated or stats.dropped:
        logger.warning(
            "%s: %d of %d examples had their prompt truncated to fit max_length=%d; %d dropped (target alone too long)",
            name, stats.truncated, len(examples), max_length, stats.dropped,
        )
    return features, stats
