"""Inputs on which lorasens' E2E metrics are compared with the official E2E NLG scorer (tests/test_official_scores.py).

- `HANDMADE`: sentences written for this test (not taken from any dataset): mixed case, punctuation, "£", "é", a
  "0" token (mteval's Perl treats the n-gram prefix "0" as false), a duplicated reference and 1 to 4 references
  per prediction.
- `devset_case`: built at test time from ../shared/data/e2e/devset.csv: for each of the first `num_mrs` MRs (file
  order) the first reference is the prediction and the other references (duplicates kept) are its references;
  `case` "lower" / "upper" lower-/upper-cases the prediction only.
"""

from __future__ import annotations

import csv
from pathlib import Path

HANDMADE: list[tuple[str, list[str]]] = [
    ("The Golden Lion is a cheap pub near the river, rated 0 out of 5.",
     ["The Golden Lion is a cheap pub by the river with a rating of 0 out of 5.",
      "Rated 0 out of 5, The Golden Lion is a cheap riverside pub.",
      "The Golden Lion is a cheap pub by the river with a rating of 0 out of 5."]),
    ("Café Verde serves Italian food for £20-25 in the city centre.",
     ["In the city centre, Café Verde serves Italian food for £20-25.",
      "Café Verde is an Italian place in the city centre; prices are £20-25."]),
    ("Blue Harbour is a family-friendly coffee shop. It is not expensive!",
     ["Blue Harbour is a cheap, family friendly coffee shop."]),
    ("the old mill offers english food near riverside park",
     ["The Old Mill offers English food near Riverside Park.",
      "Near Riverside Park, The Old Mill serves English food.",
      "English food is served at The Old Mill, near Riverside Park.",
      "The Old Mill is an English restaurant near Riverside Park."]),
]

CASES = ("as_is", "lower", "upper")


def devset_case(path: str | Path, num_mrs: int | None, case: str) -> tuple[list[str], list[list[str]]]:
    """(predictions, references) from the E2E dev set as described in the module docstring."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    by_mr: dict[str, list[str]] = {}
    for row in rows:
        by_mr.setdefault(row["mr"], []).append(row["ref"])
    groups = [refs for refs in by_mr.values() if len(refs) > 1][:num_mrs]
    change = {"as_is": str, "lower": str.lower, "upper": str.upper}[case]
    return [change(refs[0]) for refs in groups], [refs[1:] for refs in groups]
