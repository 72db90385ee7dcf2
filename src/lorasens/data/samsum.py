"""SAMSum (Gliwa et al. 2019): messenger-style dialogue -> abstractive summary. Scored with ROUGE-1/2/L/Lsum.

Local files: `train`, `validation`, `test` as `.jsonl` (one `{id, dialogue, summary}` a line, the Hugging Face
export) or `.json` (a list of such objects, the original release). When the test file is absent (the offline copy
has only train and validation) evaluation uses the validation split and logs that it did; training never sees it.
Dialogues or summaries that are empty (one train dialogue, id 13828807, is) are dropped and counted in the log.
Hub: `knkarthick/samsum`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lorasens.data.files import find_file, read_records
from lorasens.data.hub import load_hub_split
from lorasens.data.registry import DatasetSpec, EvaluationSpec, Example, register
from lorasens.errors import UserError
from lorasens.metrics import prediction_columns, samsum_metrics

logger = logging.getLogger(__name__)


def score_samsum_rows(rows: list[dict]) -> dict:
    return samsum_metrics(*prediction_columns(rows))

HUB_ID = "knkarthick/samsum"
FIELDS = ("id", "dialogue", "summary")
SUFFIXES = (".jsonl", ".json")
PROMPT = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:"


def make_examples(records: list[dict], split: str, source: str) -> list[Example]:
    examples, empty = [], 0
    for record in records:
        # Dialogue lines are separated by \r\n in the export; one line ending keeps prompts and tokens uniform.
        dialogue = str(record["dialogue"] or "").replace("\r\n", "\n").strip()
        summary = str(record["summary"] or "").strip()
        if not dialogue or not summary:
            empty += 1
            continue
        examples.append(Example(f"{split}-{record['id']}", PROMPT.format(dialogue=dialogue), summary, (summary,),
                                {"dialogue": dialogue}))
    if empty:
        logger.warning("SAMSum %s (%s): dropped %d example(s) with an empty dialogue or summary", split, source, empty)
    return examples


def load(split: str, data_dir: Path | None, seed: int) -> list[Example]:
    if data_dir is None:

        return make_examples(list(load_hub_split(HUB_ID, split)), split, HUB_ID)
    path = find_file(data_dir, (split,), SUFFIXES)
    if path is None and split == "test":
        path = find_file(data_dir, ("validation",), SUFFIXES)
        if path is not None:
            logger.warning("SAMSum: no test.jsonl/test.json in %s; evaluating on %s instead", data_dir, path.name)
    if path is None:
        raise UserError(f"--data_dir {str(data_dir)!r} lacks {split}.jsonl or {split}.json (SAMSum needs train, "
                        "validation and optionally test, with fields id, dialogue, summary)")
    return make_examples([record for _, record in read_records(path, FIELDS)], split, str(path))


SPEC = register(DatasetSpec("samsum", "SAMSum: dialogue -> summary (ROUGE-1/2/L/Lsum, BLEU, METEOR)", load,
                            EvaluationSpec(score_samsum_rows, needs_meteor=True), max_new_tokens=96,
                            analysis_samples=100))  # long dialogues: fewer examples per ablation pass
