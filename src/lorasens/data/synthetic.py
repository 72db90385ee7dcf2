"""An offline E2E-style dataset generated in code: restaurant meaning representations -> sentences.

Each MR gets three references from different sentence templates, so multi-reference scoring works as on E2E.
Deterministic for a seed; an MR belongs to exactly one split (chosen by a stable hash of its text), so the
evaluation split never overlaps training.
"""

from __future__ import annotations

import random
import zlib
from functools import lru_cache
from pathlib import Path

from lorasens.data.e2e import EVALUATION as E2E_EVALUATION
from lorasens.data.e2e import PROMPT
from lorasens.data.registry import DatasetSpec, Example, register

NAMES = ["The Eagle", "Blue Spice", "The Mill", "Aromi", "Zizzi", "Cotto", "The Phoenix", "Green Man", "Loch Fyne",
         "The Punter", "Strada", "Wildwood", "Giraffe", "The Vaults", "Alimentum", "Fitzbillies", "Clowns"]
EAT_TYPES = ["restaurant", "pub", "coffee shop"]
FOODS = ["Italian", "French", "Chinese", "Indian", "Japanese", "English", "Fast food"]
PRICES = ["cheap", "moderate", "high", "less than £20", "more than £30"]
RATINGS = ["low", "average", "high", "1 out of 5", "5 out of 5"]
AREAS = ["city centre", "riverside"]
SPLIT_SIZES = {"train": 2000, "validation": 200, "test": 200}  # distinct MRs per split


def _mr(rng: random.Random) -> dict[str, str]:
    slots = {"name": rng.choice(NAMES), "eatType": rng.choice(EAT_TYPES), "food": rng.choice(FOODS)}
    for key, values in (("priceRange", PRICES), ("customer rating", RATINGS), ("area", AREAS)):
        if rng.random() < 0.7:
            slots[key] = rng.choice(values)
    if rng.random() < 0.5:
        slots["familyFriendly"] = rng.choice(["yes", "no"])
    return slots


def _describe(slots: dict[str, str], style: int) -> str:
    name, kind, food = slots["name"], slots["eatType"], slots["food"]
    parts = []
    if "priceRange" in slots:
        parts.append(f"prices are {slots['priceRange']}" if style != 1 else f"it has a {slots['priceRange']} price range")
    if "customer rating" in slots:
        parts.append(f"customers rate it {slots['customer rating']}")
    if "area" in slots:
        parts.append(f"it is in the {slots['area']}")
    if "familyFriendly" in slots:
        parts.append("it is family friendly" if slots["familyFriendly"] == "yes" else "it is not family friendly")
    if style == 0:
        head = f"{name} is a {kind} serving {food} food"
    elif style == 1:
        head = f"{name} is an {food} {kind}" if food[0] in "AEIOU" else f"{name} is a {food} {kind}"
    else:
        head = f"For {food} food, try {name}, a {kind}"
    if not parts:
        return head + "."
    if style == 2:
        parts = parts[::-1]
    return head + ", and " + ", ".join(parts) + "." if len(parts) == 1 else head + ". " + "; ".join(parts).capitalize() + "."


def _split_of(mr_text: str) -> str:
    bucket = zlib.crc32(mr_text.encode()) % 20
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def generate(split: str, seed: int = 0) -> list[tuple[str, str]]:
    """(mr, ref) pairs for `split`: SPLIT_SIZES[split] distinct MRs, three references each."""
    return list(_generated(split, seed))


@lru_cache(maxsize=16)  # a split takes ~50 ms to draw; validate and sweeps load the same ones for every training
def _generated(split: str, seed: int) -> tuple[tuple[str, str], ...]:
    rng = random.Random(f"lorasens-synthetic-{seed}")
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    attempts = 0
    while len(seen) < SPLIT_SIZES[split] and attempts < 200_000:
        attempts += 1
        slots = _mr(rng)
        mr = ", ".join(f"{k}[{v}]" for k, v in slots.items())
        if mr in seen or _split_of(mr) != split:
            continue
        seen.add(mr)
        pairs.extend((mr, _describe(slots, style)) for style in range(3))
    return tuple(pairs)


def load(split: str, data_dir: Path | None, seed: int) -> list[Example]:
    refs: dict[str, list[str]] = {}
    pairs = generate(split, seed)
    for mr, ref in pairs:
        refs.setdefault(mr, []).append(ref)
    return [
        Example(f"{split}-{i}", PROMPT.format(mr=mr), ref, tuple(refs[mr]), {"mr": mr}) for i, (mr, ref) in enumerate(pairs)
    ]


# E2E-shaped (three references per MR), so scored like E2E.
SPEC = register(DatasetSpec("synthetic", "Offline E2E-style restaurant MR -> description, generated in code", load,
                            E2E_EVALUATION, max_new_tokens=64))
