"""Write a small dataset of your own kind for the README's "analyse your own data" example.

The task: write a number in English words ("Write 347 in words." -> "three hundred forty-seven"). Generated here,
deterministically from --seed, so nothing is downloaded or copied. Two files, both only a training split (lorasens
cuts validation and test off by a hash of each row):

- OUT/train.jsonl: prompt/completion rows ({"prompt": ..., "completion": ...}), for any model;
- OUT/chat/train.jsonl: the same pairs as chat rows ({"messages": [{role, content}, ...]}), for a model with a chat
  template (smollm2-135m).

    python scripts/make_example_data.py --out data/own --rows 400
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def in_words(n: int) -> str:
    """0 <= n < 1,000,000 in words, American style without "and": 347 -> three hundred forty-seven."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        return ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + in_words(n % 100))
    return in_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + in_words(n % 1000))


def rows(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    numbers = rng.sample(range(1, 10_000), count)  # distinct, so no pair is repeated across splits
    return [(f"Write {n} in words.\nAnswer:", in_words(n)) for n in numbers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/own", help="Output folder (default: data/own).")
    parser.add_argument("--rows", type=int, default=400, help="Number of rows (default: 400).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    (out / "chat").mkdir(parents=True, exist_ok=True)
    pairs = rows(args.rows, args.seed)
    with (out / "train.jsonl").open("w", encoding="utf-8") as fh:
        for prompt, answer in pairs:
            fh.write(json.dumps({"prompt": prompt, "completion": answer}) + "\n")
    with (out / "chat" / "train.jsonl").open("w", encoding="utf-8") as fh:
        for prompt, answer in pairs:
            question = prompt.removesuffix("\nAnswer:")
            messages = [{"role": "system", "content": "You write numbers in English words."},
                        {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            fh.write(json.dumps({"messages": messages}) + "\n")
    print(f"wrote {len(pairs)} rows to {out / 'train.jsonl'} and {out / 'chat' / 'train.jsonl'}")


if __name__ == "__main__":
    main()
