"""Examples -> training features: prompt + target tokens, with the loss on the target tokens only.

Truncation never silently drops the target: when prompt + target is too long the prompt is cut from the left
(keeping BOS and the end of the prompt, which holds the answer cue); an example whose target alone does not fit
is dropped. Both counts are returned and logged.

Chat examples (`Example.messages`) are rendered with the tokenizer's chat template and the loss covers the
assistant turns only. The conversation is cut into segments at the turn boundaries the template itself produces:
for each assistant turn i, `render(turns[:i], add_generation_prompt=True)` ends where the answer starts and
`render(turns[:i+1])` where it ends; the template must extend each rendering by appending (a check, else a
`UserError`). Segments are tokenised separately and concatenated, so the label mask is exact by construction and
the evaluation prompt (all segments before the last answer) has the very tokens training saw. An answer segment is
labelled up to its last EOS token (the end-of-turn marker); template glue after it (a newline) is context. A chat
example longer than `max_length` is cut from the left; one whose last answer alone does not fit is dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lorasens.data.registry import Example
from lorasens.errors import UserError

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


def check_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UserError(f"the tokenizer of {name!r} has no chat template, which chat rows (messages) need; use a chat/"
                        "instruct model (e.g. --model smollm2-135m) or give the rows as prompt/completion")


def _render(tokenizer, turns, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(turns), tokenize=False, add_generation_prompt=generation_prompt)


def chat_segments(tokenizer, messages: tuple[dict, ...]) -> list[tuple[list[int], bool]]:
    """(token ids, is answer) segments of a rendered conversation; the answer segments carry the loss."""
    check_chat_template(tokenizer)
    texts: list[tuple[str, bool]] = []
    done = ""
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        head, full = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1])
        if not (head.startswith(done) and full.startswith(head)):
            raise UserError("the chat template does not render a conversation by appending turns (the text up to "
                            f"assistant turn {i + 1} changes when the turn is added); its answers cannot be masked")
        texts += [(head[len(done):], False), (full[len(head):], True)]
        done = full
    eos = tokenizer.eos_token_id
    segments = []
    for text, answer in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if answer and eos in ids:  # label up to the end-of-turn token; what follows is formatting
            end = len(ids) - ids[::-1].index(eos)
            segments += [(ids[:end], True), (ids[end:], False)]
        else:
            segments.append((ids, answer))
    return [(ids, answer) for ids, answer in segments if ids]


def chat_prompt_ids(tokenizer, messages: tuple[dict, ...]) -> list[int]:
    """The tokens before the last answer: what generation continues (the same tokens training saw)."""
    segments = chat_segments(tokenizer, messages)
    last = max(i for i, (_, answer) in enumerate(segments) if answer)
    return [t for ids, _ in segments[:last] for t in ids]


def prompt_input(tokenizer, example: Example) -> str | list[int]:
    """What generation gets for an example: the prompt text, or a chat example's prompt token ids."""
    return chat_prompt_ids(tokenizer, example.messages) if example.messages else example.prompt


def _chat_feature(tokenizer, ex: Example, max_length: int, stats: FeatureStats) -> dict | None:
    segments = chat_segments(tokenizer, ex.messages)
    ids = [t for seg, _ in segments for t in seg]
    labels = [t if answer else IGNORE_INDEX for seg, answer in segments for t in seg]
    last = max(i for i, (_, answer) in enumerate(segments) if answer)
    if sum(len(seg) for seg, _ in segments[last:]) >= max_length:  # the last answer (and what follows) must fit
        stats.dropped += 1
        return None
    if len(ids) > max_length:
        stats.truncated += 1
        ids, labels = ids[-max_length:], labels[-max_length:]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def build_features(examples: list[Example], tokenizer, max_length: int, name: str = "train") -> tuple[list[dict], FeatureStats]:
    stats = FeatureStats()
    features = []
    for ex in examples:
        if ex.messages:
            feature = _chat_feature(tokenizer, ex, max_length, stats)
            if feature is not None:
                features.append(feature)
                stats.examples += 1
            continue
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
