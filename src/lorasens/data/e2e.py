"""E2E NLG (Novikova et al. 2017): restaurant meaning representation -> one-sentence description.

Local files (official release): `trainset.csv`, `devset.csv`, `testset_w_refs.csv`, columns `mr,ref`; several rows
share one MR (multi-reference). Hub: `tuetschek/e2e_nlg` (columns meaning_representation, human_reference).
When the test file is absent (the public release without test references), the test split is the whole
`devset.csv` (547 MRs, every reference) and the validation split is cut from `trainset.csv` by MR (a stable hash of
the MR picks 5% of them), so train, validation and test never share an MR. The analysis split is then carved out of
what remains of train (see `registry.training_splits`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from lorasens.data.files import stable_bucket
from lorasens.data.hub import load_hub_split
from lorasens.data.registry import DatasetSpec, EvaluationSpec, Example, group_by_prompt, read_csv_rows, register
from lorasens.errors import UserError
from lorasens.metrics import e2e_metrics, prediction_columns

logger = logging.getLogger(__name__)


def group_e2e_rows(rows: list[dict]) -> list[dict]:
    """One row per distinct prompt (MR) with the union of its references, as the E2E scripts score."""
    examples = [Example(str(r["id"]), r["prompt"], r["prediction"], tuple(r["references"])) for r in rows]
    grouped = group_by_prompt(examples)
    if len(grouped) < len(rows):
        logger.info("E2E scoring: %d rows grouped into %d distinct MRs (first prediction per MR)", len(rows), len(grouped))
    return [{"id": ex.id, "prompt": ex.prompt, "prediction": ex.target, "references": list(ex.references)} for ex in grouped]


def score_e2e_rows(rows: list[dict]) -> dict:
    """E2E (and the E2E-shaped synthetic set): one prediction per distinct MR against all of its references."""
    return e2e_metrics(*prediction_columns(group_e2e_rows(rows)))


def segment_e2e_rows(rows: list[dict]) -> dict:
    """Per-MR statistics of the official BLEU and ROUGE-L, for a bootstrap over test prompts (validate)."""
    from lorasens.metrics.segments import bleu_segments, rouge_l_segments

    predictions, references = prediction_columns(group_e2e_rows(rows))
    return {"bleu": bleu_segments(predictions, references), "rouge_l": rouge_l_segments(predictions, references)}

HUB_ID = "tuetschek/e2e_nlg"
FILES = {"train": "trainset.csv", "validation": "devset.csv", "test": "testset_w_refs.csv"}
PROMPT = "Meaning representation: {mr}\nDescription:"
VALIDATION_BUCKETS = range(0, 5)  # of 100, by MR: the validation part of trainset.csv when devset.csv is the test


def make_examples(pairs: list[tuple[str, str]], split: str) -> list[Example]:
    """One example per (mr, ref) row; `references` holds every reference of the same MR."""
    refs_by_mr: dict[str, list[str]] = {}
    for mr, ref in pairs:
        refs_by_mr.setdefault(mr, []).append(ref)
    return [
        Example(f"{split}-{i}", PROMPT.format(mr=mr), ref, tuple(refs_by_mr[mr]), {"mr": mr})
        for i, (mr, ref) in enumerate(pairs)
    ]


def load(split: str, data_dir: Path | None, seed: int) -> list[Example]:
    if data_dir is None:
        return make_examples(_load_hub(split), split)
    if (data_dir / FILES["test"]).exists():
        return make_examples(_read_pairs(data_dir, FILES[split]), split)
    if split == "test":
        logger.info("E2E: no %s in %s; the test split is devset.csv and validation is 5%% of trainset.csv's MRs",
                    FILES["test"], data_dir)
        return make_examples(_read_pairs(data_dir, FILES["validation"]), split)
    pairs = _read_pairs(data_dir, FILES["train"])
    wanted = split == "validation"
    return make_examples([(mr, ref) for mr, ref in pairs if (stable_bucket(mr) in VALIDATION_BUCKETS) == wanted], split)


def _read_pairs(data_dir: Path, name: str) -> list[tuple[str, str]]:
    path = data_dir / name
    if not path.exists():
        raise UserError(f"--data_dir {str(data_dir)!r} lacks {name} (E2E needs {FILES['train']} and {FILES['validation']}, "
                        f"and {FILES['test']} when it has test references)")
    pairs = [(r["mr"].strip(), r["ref"].strip()) for r in read_csv_rows(path, ("mr", "ref"))]
    kept = [(mr, ref) for mr, ref in pairs if mr and ref]
    if len(kept) < len(pairs):
        logger.warning("E2E %s: dropped %d of %d row(s) with an empty mr or ref", path, len(pairs) - len(kept), len(pairs))
    if not kept:
        raise UserError(f"{path}: every row has an empty mr or ref")
    return kept


def _load_hub(split: str) -> list[tuple[str, str]]:

    ds = load_hub_split(HUB_ID, split, revision="refs/convert/parquet")
    return [(r["meaning_representation"], r["human_reference"]) for r in ds]


# Scored the way the E2E challenge scores: one prediction per distinct MR against all of its references.
EVALUATION = EvaluationSpec(score_e2e_rows, needs_meteor=True, segment_rows=segment_e2e_rows)
SPEC = register(DatasetSpec("e2e", "E2E NLG: restaurant MR -> description (BLEU/NIST/METEOR/ROUGE-L/CIDEr)", load,
                            EVALUATION, max_new_tokens=64))
