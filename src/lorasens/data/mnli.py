"""MultiNLI (Williams et al. 2018): premise + hypothesis -> entailment | neutral | contradiction.

Scored by accuracy on the matched and the mismatched dev sets, two ways: the label word with the highest
log-likelihood after the prompt, and the label the model generates.

Splits. The MNLI test sets carry no labels, so evaluation ("test") is dev *matched*; dev *mismatched* is scored
beside it when available. "validation" (loss during training) is a fixed 2 % of the training set, held out of
"train" by a hash of the text pair. When no training file is present (the offline copy has only
dev_matched.jsonl), dev_matched is split by the same hash into train (80 %), validation (5 %) and test (15 %) parts,
with a warning, so training and evaluation never share a pair.

Local files: `train`, `dev_matched`, `dev_mismatched` (also the official `multinli_1.0_*` and GLUE
`validation_*` names) as `.jsonl` or GLUE/official `.tsv`; fields premise/hypothesis/label or
sentence1/sentence2/gold_label; labels as words or GLUE integers (0 entailment, 1 neutral, 2 contradiction);
pairs without a gold label ("-", -1) are skipped. Hub: `nyu-mll/glue`, config `mnli`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from lorasens.data.files import find_file, read_records, read_tsv_records, stable_bucket
from lorasens.data.hub import load_hub_split
from lorasens.data.registry import DatasetSpec, EvaluationSpec, Example, register
from lorasens.errors import UserError
from lorasens.metrics import References, reference_lists
from lorasens.safeio import read_text

logger = logging.getLogger(__name__)

MNLI_LABELS = ("entailment", "neutral", "contradiction")  # index = GLUE's integer label
UNLABELLED = frozenset({"-1", "-", ""})  # GLUE marks pairs without a gold label -1, the MNLI files "-"


def first_label_word(text: str) -> str:
    """The label a generation names: its first word, lowercased, without punctuation."""
    match = re.search(r"[A-Za-z]+", text)
    return match.group(0).lower() if match else ""


def mnli_label(value) -> str | None:
    """The MNLI label a prediction or reference names: a label word (a generation's first word) or a GLUE id
    (0 entailment, 1 neutral, 2 contradiction); None for GLUE's unlabelled pairs (-1, "-") and empty text."""
    text = str(value).strip().lower()
    if text in UNLABELLED:
        return None
    if text.isdigit():
        return MNLI_LABELS[int(text)] if int(text) < len(MNLI_LABELS) else text
    return first_label_word(text) or None


def mnli_metrics(predictions: Sequence, references: References) -> dict:
    """Accuracy of predicted labels (words or GLUE ids) over the labelled pairs; unlabelled pairs are excluded and
    counted in `unlabelled_excluded`, and accuracy is None when no pair has a label."""
    refs = reference_lists(predictions, references)
    gold = [mnli_label(rs[0]) for rs in refs]
    unknown = sorted({str(rs[0]) for rs, g in zip(refs, gold) if g is not None and g not in MNLI_LABELS})
    if unknown:
        raise UserError(f"MNLI reference label(s) {', '.join(map(repr, unknown[:5]))} are not one of "
                        f"{', '.join(MNLI_LABELS)}, 0/1/2 or -1/- (unlabelled)")
    scored = [(mnli_label(p), g) for p, g in zip(predictions, gold) if g is not None]
    correct = sum(p == g for p, g in scored)
    return {"accuracy": correct / len(scored) if scored else None, "unlabelled_excluded": len(refs) - len(scored)}


def score_mnli_rows(rows: list[dict]) -> dict:
    """Per subset (matched / mismatched / ...): label log-likelihood accuracy and generated-label accuracy over the
    labelled pairs, how many were scored, and how many unlabelled pairs (-1, "-") were excluded."""
    metrics: dict = {}
    subsets: dict[str, list[dict]] = {}
    for row in rows:
        subsets.setdefault(str(row.get("subset", "all")), []).append(row)
    for name, part in subsets.items():
        refs = [r["references"] for r in part]
        if all("ll_prediction" in r for r in part):
            metrics[f"accuracy_{name}"] = mnli_metrics([r["ll_prediction"] for r in part], refs)["accuracy"]
        generated = mnli_metrics([r["prediction"] for r in part], refs)
        metrics[f"generated_accuracy_{name}"] = generated["accuracy"]
        metrics[f"num_{name}"] = len(part) - generated["unlabelled_excluded"]
        metrics[f"unlabelled_excluded_{name}"] = generated["unlabelled_excluded"]
        if generated["unlabelled_excluded"]:
            logger.warning("MNLI %s: %d row(s) without a gold label (-1 / -) are excluded from the accuracy",
                           name, generated["unlabelled_excluded"])
    return metrics

HUB_ID, HUB_CONFIG = "nyu-mll/glue", "mnli"
EVAL_SETS = ("matched", "mismatched")
PROMPT = ("Premise: {premise}\nHypothesis: {hypothesis}\n"
          "Does the premise entail the hypothesis? Answer entailment, neutral or contradiction.\nAnswer:")
STEMS = {
    "train": ("train", "multinli_1.0_train"),
    "matched": ("dev_matched", "validation_matched", "multinli_1.0_dev_matched"),
    "mismatched": ("dev_mismatched", "validation_mismatched", "multinli_1.0_dev_mismatched"),
}
SUFFIXES = (".jsonl", ".tsv")
HUB_SPLITS = {"train": "train", "matched": "validation_matched", "mismatched": "validation_mismatched"}
VALIDATION_BUCKETS = range(0, 2)  # of 100: the part of train held out for validation loss
DEV_ONLY_PARTS = {"train": range(0, 80), "validation": range(80, 85), "test": range(85, 100)}
_ALIASES = {"premise": ("premise", "sentence1"), "hypothesis": ("hypothesis", "sentence2"), "label": ("label", "gold_label")}
NO_GOLD = {"-", "-1", ""}


def _field(record: dict, name: str):
    for key in _ALIASES[name]:
        if key in record:
            return record[key]
    return None


def _label(path: str, lineno: int, value) -> str | None:
    text = str(value).strip().lower()
    if text in NO_GOLD:
        return None
    if text in MNLI_LABELS:
        return text
    if text.isdigit() and int(text) < len(MNLI_LABELS):
        return MNLI_LABELS[int(text)]
    raise UserError(f"{path}:{lineno}: label {value!r} is not one of {', '.join(MNLI_LABELS)} or 0/1/2")


def _bucket(ex: Example) -> int:
    return stable_bucket(ex.meta["premise"] + "\t" + ex.meta["hypothesis"])


def make_examples(rows: list[tuple[int, dict]], prefix: str, source: str) -> list[Example]:
    examples, skipped = [], 0
    for lineno, record in rows:
        missing = [n for n in _ALIASES if _field(record, n) is None]
        if missing:
            expected = "; ".join(" or ".join(_ALIASES[n]) for n in missing)
            raise UserError(f"{source}:{lineno}: missing field(s) {expected}")
        label = _label(source, lineno, _field(record, "label"))
        if label is None:
            skipped += 1
            continue
        premise, hypothesis = str(_field(record, "premise")).strip(), str(_field(record, "hypothesis")).strip()
        examples.append(Example(f"{prefix}-{lineno}", PROMPT.format(premise=premise, hypothesis=hypothesis), label,
                                (label,), {"premise": premise, "hypothesis": hypothesis}))
    if skipped:
        logger.info("MNLI %s: skipped %d pair(s) without a gold label", source, skipped)
    return examples


def read_file(path: Path, prefix: str) -> list[Example]:
    if path.suffix == ".tsv":
        columns = read_text(path).split("\n", 1)[0].rstrip("\r").split("\t")
        required = tuple(next((k for k in keys if k in columns), keys[0]) for keys in _ALIASES.values())
        return make_examples(read_tsv_records(path, required), prefix, str(path))
    return make_examples(read_records(path, ()), prefix, str(path))


def load_set(name: str, data_dir: Path | None) -> list[Example] | None:
    """All labelled pairs of one file ("train", "matched" or "mismatched"); None when it is not there."""
    if data_dir is None:

        ds = load_hub_split(HUB_ID, HUB_SPLITS[name], config=HUB_CONFIG)
        return make_examples(list(enumerate(ds, start=1)), name, f"{HUB_ID}/{HUB_CONFIG}:{HUB_SPLITS[name]}")
    path = find_file(data_dir, STEMS[name], SUFFIXES)
    return None if path is None else read_file(path, name)


def load(split: str, data_dir: Path | None, seed: int) -> list[Example]:
    train = load_set("train", data_dir)
    if train is None:
        matched = load_set("matched", data_dir)
        if matched is None:
            raise UserError(f"--data_dir {str(data_dir)!r} has neither train nor dev_matched (.jsonl or .tsv) for MNLI")
        part = DEV_ONLY_PARTS[split]
        logger.warning("MNLI: no training file in %s; the %s split is %d %% of dev_matched (hash buckets %d-%d of 100)",
                       data_dir, split, len(part), part.start, part.stop - 1)
        return [ex for ex in matched if _bucket(ex) in part]
    if split == "train":
        return [ex for ex in train if _bucket(ex) not in VALIDATION_BUCKETS]
    if split == "validation":
        return [ex for ex in train if _bucket(ex) in VALIDATION_BUCKETS]
    matched = load_set("matched", data_dir)
    if matched is None:
        raise UserError(f"--data_dir {str(data_dir)!r} lacks dev_matched.jsonl or dev_matched.tsv (MNLI evaluation)")
    return matched


def load_mismatched(data_dir: Path | None) -> list[Example] | None:
    """The mismatched dev set, or None when the local folder does not have it (scored as unavailable).

    Never part of any training split, also in dev-only mode (that trains on a part of dev_matched)."""
    return load_set("mismatched", data_dir)


def eval_sets(split: str, data_dir: Path | None, select) -> tuple[dict[str, list[Example]], dict]:
    """Final evaluation on dev matched and, when the folder has it, dev mismatched (else its metrics are null)."""
    if split == "validation":
        return {"validation": select()}, {}
    sets = {"matched": select()}
    mismatched = load_mismatched(data_dir)
    if mismatched is None:
        reason = f"no dev_mismatched file in {data_dir}"
        return sets, {"accuracy_mismatched": None, "generated_accuracy_mismatched": None,
                      "accuracy_mismatched_unavailable": reason}
    sets["mismatched"] = select(mismatched)
    return sets, {}


SPEC = register(DatasetSpec("mnli", "MultiNLI: premise + hypothesis -> label (accuracy, matched and mismatched)", load,
                            EvaluationSpec(score_mnli_rows, label_choices=MNLI_LABELS, eval_sets=eval_sets),
                            max_new_tokens=4))
