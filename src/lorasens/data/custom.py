"""Your own data: prompt/completion or chat rows from local files (`--dataset custom`) or the Hub (`hf:ORG/NAME`).

Sources.
- Files: `--data_dir DIR` holding `train`, `validation`, `test` (the stems are `--split_*`) as `.jsonl`, `.json`,
  `.csv` or `.parquet`, or `--data_files train=a.jsonl,test=b.csv` (one bare path is the training file). They are
  read with `datasets` (its json/csv/parquet builders); CSV cells are read as text, so an answer `4` stays "4".
- Hub: `--dataset hf:ORG/NAME[:CONFIG]` through `datasets.load_dataset` (a local dataset folder works the same way:
  `hf:/path/to/folder`); the split names are `--split_*`.

Only the training split is required. A missing validation or test split is cut from the training rows by a stable
hash of the row (SHA-256 of its JSON, buckets of 1/10000): `--validation_fraction` / `--test_fraction` (default 0.1
each). The hash does not depend on the seed, so runs that differ only in their seed train and evaluate on the same
rows (what `compare` pools), and no row is in two splits.

Rows.
- prompt/completion: `--prompt_field` / `--target_field` (default `prompt` / `completion`); `--prompt_template`
  can build the prompt from any columns (every column is a template field).
- chat: without those flags, rows with a `messages` column ([{role, content}, ...], TRL's conversational format;
  roles system, user, assistant; the last turn is the assistant's) are rendered with the tokenizer's chat template;
  the loss covers the assistant turns (features.py) and evaluation generates the last one.
Bad rows are refused, not skipped: an empty or non-string prompt or target, or a malformed `messages` list, stops
the run with the count and the first offending row, so a model is never trained on a silently smaller set.

Scoring: `--metrics` from exact_match, rouge_l, bleu, accuracy (`score_text_rows` below).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import datasets

from lorasens.config import (CUSTOM_DATASET, DEFAULT_HELD_OUT_FRACTION, DEFAULT_TEXT_METRICS, HUB_PREFIX, DataConfig,
                             text_metrics)
from lorasens.data.hub import load_hub_dataset
from lorasens.data.registry import SPLITS, DatasetSpec, EvaluationSpec, Example, register
from lorasens.errors import UserError, unknown_choice
from lorasens.metrics import prediction_columns
from lorasens.metrics import text_metrics as score_text_metrics  # config.text_metrics parses the --metrics flag

logger = logging.getLogger(__name__)


def score_text_rows(rows: list[dict], metrics: tuple[str, ...]) -> dict:
    """Your own data: the chosen `--metrics`, one prediction per row against its references."""
    return score_text_metrics(*prediction_columns(rows), metrics)

PROMPT_FIELD, TARGET_FIELD, MESSAGES_FIELD = "prompt", "completion", "messages"
ROLES = ("system", "user", "assistant")
HASH_BUCKETS = 10_000
READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}  # suffix -> datasets builder


@dataclass(frozen=True)
class CustomData:
    """The settings of one custom dataset, resolved from the flags (defaults filled in)."""

    name: str
    hub_id: str | None = None
    hub_config: str | None = None
    files: tuple[tuple[str, str], ...] = ()  # (split, path) from --data_files
    prompt_field: str = PROMPT_FIELD
    target_field: str = TARGET_FIELD
    fields_given: bool = False  # --prompt_field/--target_field given: never read the rows as chat
    split_names: tuple[tuple[str, str], ...] = tuple((s, s) for s in SPLITS)  # our split -> its name in the source
    fractions: tuple[tuple[str, float], ...] = (("validation", DEFAULT_HELD_OUT_FRACTION),
                                                 ("test", DEFAULT_HELD_OUT_FRACTION))
    metrics: tuple[str, ...] = DEFAULT_TEXT_METRICS
    prompt_template: str | None = None

    @classmethod
    def from_config(cls, name: str, data: DataConfig | None) -> CustomData:
        data = data if data is not None else DataConfig(dataset=name)
        hub_id = hub_config = None
        if name.startswith(HUB_PREFIX):
            hub_id, _, hub_config = name[len(HUB_PREFIX):].partition(":")
        return cls(
            name=name, hub_id=hub_id, hub_config=hub_config or None, files=parse_data_files(data.data_files),
            prompt_field=data.prompt_field or PROMPT_FIELD, target_field=data.target_field or TARGET_FIELD,
            fields_given=data.prompt_field is not None or data.target_field is not None,
            split_names=tuple((s, getattr(data, f"split_{s}") or s) for s in SPLITS),
            fractions=(("validation", data.validation_fraction or DEFAULT_HELD_OUT_FRACTION),
                       ("test", data.test_fraction or DEFAULT_HELD_OUT_FRACTION)),
            metrics=text_metrics(data.metrics) if data.metrics else DEFAULT_TEXT_METRICS,
            prompt_template=data.prompt_template,
        )


def parse_data_files(value: str | None) -> tuple[tuple[str, str], ...]:
    """`train=a.jsonl,test=b.csv` -> (("train", "a.jsonl"), ("test", "b.csv")); a bare path is the training file."""
    if not value:
        return ()
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if len(parts) == 1 and "=" not in parts[0]:
        return (("train", parts[0]),)
    files = {}
    for part in parts:
        split, sep, path = part.partition("=")
        if not sep or not path.strip():
            raise UserError(f"--data_files {value!r}: write SPLIT=PATH pairs (train=a.jsonl,test=b.jsonl) or one PATH")
        if split.strip() not in SPLITS:
            raise unknown_choice("split in --data_files", split.strip(), SPLITS)
        if split.strip() in files:  # the second would silently replace the first (and config.json list both)
            raise UserError(f"--data_files {value!r} names {split.strip()}= twice; give one file per split "
                            "(concatenate the files first)")
        files[split.strip()] = path.strip()
    if "train" not in files:
        raise UserError(f"--data_files {value!r} has no train=PATH; the training split is required")
    return tuple(files.items())


# ---------------------------------------------------------------------------------------------------- reading


@contextmanager
def quiet_datasets():
    """No "Generating train split" bars from `datasets` while a file is read: an error must stay one line."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def read_table(path: Path) -> list[dict]:
    """The rows of one JSONL / JSON / CSV / Parquet file, read with `datasets`."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{path}: unknown file type {path.suffix!r}; expected {', '.join(READERS)}")
    if path.stat().st_size == 0 or (kind != "parquet" and not path.read_bytes().strip()):
        raise UserError(f"{path}: file is empty")
    options: dict = {}
    if kind == "csv":
        # Cells are text: without this, pandas turns an answer "4" into the integer 4 and "NA" into a missing value.
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is read, not made part of the first column's name.
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            if next((r for r in reader if any(c.strip() for c in r)), None) is None:
                raise UserError(f"{path}: file has no rows (only the header {','.join(header)!r})")
        options = {"features": datasets.Features({c: datasets.Value("string") for c in header}),
                   "keep_default_na": False, "encoding": "utf-8-sig"}
    elif path.suffix.lower() == ".jsonl":
        check_jsonl_lines(path)
    try:
        with quiet_datasets():
            table = datasets.load_dataset(kind, data_files=str(path), split="train", **options)
    except Exception as exc:  # the builders' own errors (bad JSON, ragged CSV, not parquet): name the file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: cannot read it as {kind}: {first}") from None
    rows = table.to_list()
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def check_jsonl_lines(path: Path) -> None:
    """A malformed JSONL line named by its line number (the json builder only says "position N")."""
    with path.open(encoding="utf-8-sig", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: line {number} is not valid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}: line {number} is not a JSON object ({{\"prompt\": ..., ...}})")


def source_tables(data: CustomData, data_dir: Path | None) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Rows of every split the source has (train always), and where each came from (for messages)."""
    names = dict(data.split_names)
    if data.hub_id is not None:
        with quiet_datasets():
            found = load_hub_dataset(data.hub_id, data.hub_config)
        if names["train"] not in found:
            raise UserError(f"{data.name} has no split {names['train']!r} (found: {', '.join(found)}); name the "
                            "training split with --split_train")
        present = [s for s in SPLITS if names[s] in found]
        return {s: found[names[s]].to_list() for s in present}, {s: f"{data.name} ({names[s]})" for s in present}
    if data.files:  # DataConfig refuses --data_files with --data_dir
        return {s: read_table(Path(p).expanduser()) for s, p in data.files}, dict(data.files)
    if data_dir is None:
        raise UserError(f"--dataset {CUSTOM_DATASET} needs --data_dir DIR (with {names['train']}.jsonl, .csv or "
                        ".parquet) or --data_files train=PATH; a Hub dataset is --dataset hf:ORG/NAME")
    tables, sources = {}, {}
    for split in SPLITS:
        path = next((data_dir / f"{names[split]}{suffix}" for suffix in READERS
                     if (data_dir / f"{names[split]}{suffix}").exists()), None)
        if path is not None:
            tables[split], sources[split] = read_table(path), str(path)
        elif split == "train":
            found = ", ".join(sorted(p.name for p in data_dir.iterdir())) or "nothing"
            raise UserError(f"--data_dir {str(data_dir)!r} has no {names['train']}{{{','.join(READERS)}}} (found: "
                            f"{found}); name the training file's stem with --split_train")
    return tables, sources


def hash_part(data: CustomData, tables: dict[str, list[dict]], row: dict) -> str:
    """Which split a training row belongs to when the source lacks held-out splits: validation takes the hash
    buckets [0, v), test [v, v + t) of the missing ones, the rest is train."""
    fractions = dict(data.fractions)
    bounds = {"validation": (0.0, fractions["validation"]),
              "test": (fractions["validation"], fractions["validation"] + fractions["test"])}
    bucket = row_bucket(row)
    return next((s for s, (lo, hi) in bounds.items()
                 if s not in tables and lo * HASH_BUCKETS <= bucket < hi * HASH_BUCKETS), "train")


def row_bucket(row: dict) -> int:
    """A bucket in [0, HASH_BUCKETS) that depends only on the row's content, the same on every machine and run.

    SHA-256, not crc32 (`files.stable_bucket`): crc32 is linear, so rows that differ in a few characters (numbered
    questions) get correlated buckets; on 50 rows "Q1: ...".."Q50: ..." none fell in the lowest 10 %."""
    key = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % HASH_BUCKETS


# ------------------------------------------------------------------------------------------------- examples


def is_chat(data: CustomData, columns: list[str]) -> bool:
    return not data.fields_given and data.prompt_field not in columns and MESSAGES_FIELD in columns


def make_examples(data: CustomData, split: str, table: list[dict], source: str) -> list[Example]:
    """Examples of every row of one table (checked: fields present, prompts and targets non-empty text)."""
    rows = [(split, i, row) for i, row in enumerate(table)]
    columns = list(table[0])
    if is_chat(data, columns):
        if data.prompt_template is not None:
            raise UserError(f"{source}: chat rows ({MESSAGES_FIELD}) are rendered with the tokenizer's chat template; "
                            "--prompt_template applies to prompt/completion rows")
        return [chat_example(source, split, i, row) for split, i, row in rows]
    needed = ([] if data.prompt_template else [data.prompt_field]) + [data.target_field]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise UserError(f"{source}: no column {', '.join(repr(c) for c in missing)}; columns found: "
                        f"{', '.join(columns)}; choose them with --prompt_field / --target_field (or give chat rows a "
                        f"{MESSAGES_FIELD!r} column)")
    bad = [(split, i) for split, i, row in rows
           if not _text(row.get(data.target_field)) or (not data.prompt_template and not _text(row.get(data.prompt_field)))]
    if bad:
        fields = data.target_field if data.prompt_template else f"{data.prompt_field} or {data.target_field}"
        raise UserError(f"{source}: {len(bad)} row(s) with an empty or non-string {fields} (first: {bad[0][0]} row "
                        f"{bad[0][1] + 1}); refused rather than skipped: fix or remove them")
    return [Example(f"{split}-{i}", row[data.prompt_field] if not data.prompt_template else "",
                    row[data.target_field].strip(), (row[data.target_field].strip(),), dict(row))
            for split, i, row in rows]


def _text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def chat_example(source: str, split: str, i: int, row: dict) -> Example:
    where = f"{source}: {split} row {i + 1}"
    messages = row.get(MESSAGES_FIELD)
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: {MESSAGES_FIELD} must be a non-empty list of {{role, content}}")
    turns = []
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
            raise UserError(f"{where}: every message needs a string role and content, got {turn!r}")
        if turn["role"] not in ROLES:
            raise UserError(f"{where}: unknown role {turn['role']!r} in {MESSAGES_FIELD}; valid: {', '.join(ROLES)}")
        turns.append({"role": turn["role"], "content": turn["content"]})
    if turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
        raise UserError(f"{where}: the last message must be a non-empty assistant turn (the answer)")
    answer = turns[-1]["content"].strip()
    transcript = "\n".join(f"{t['role']}: {t['content']}" for t in turns[:-1])
    meta = {k: v for k, v in row.items() if k != MESSAGES_FIELD}
    return Example(f"{split}-{i}", transcript, answer, (answer,), meta, tuple(turns))


def load(data: CustomData, split: str, data_dir: Path | None, seed: int) -> list[Example]:
    tables, sources = source_tables(data, data_dir)
    if split == "train":  # check every table now (the run loads train first), not only after training
        for name in tables.keys() - {"train"}:
            make_examples(data, name, tables[name], sources[name])
    if split in tables and split != "train":
        return make_examples(data, split, tables[split], sources[split])
    source = sources["train"]
    examples = make_examples(data, "train", tables["train"], source)
    examples = [ex for ex, row in zip(examples, tables["train"]) if hash_part(data, tables, row) == split]
    if not examples:
        fraction = dict(data.fractions).get(split)
        what = "the training rows left" if split == "train" else f"--{split}_fraction {fraction:g} of the training rows"
        raise UserError(f"{source}: the {split} split ({what}, by hash, of {len(tables['train'])}) is empty; add "
                        f"rows or a {split} file" + ("" if split == "train" else f", or raise --{split}_fraction"))
    if split != "train":
        logger.info("%s: no %s split; using %d training rows (hash part, --%s_fraction)", source, split,
                    len(examples), split)
    return examples


def configure(name: str, options: DataConfig | None) -> DatasetSpec:
    """The custom spec bound to the run's flags: where the rows come from, which fields, which metrics."""
    data = CustomData.from_config(name, options)
    # No stop string: answers may span lines; generation ends at EOS, which training appends to every answer.
    evaluation = EvaluationSpec(partial(score_text_rows, metrics=data.metrics), stop_strings=())
    return dataclasses.replace(SPEC, name=name, load=partial(load, data), evaluation=evaluation, configure=None,
                               name_prefix=None)


SPEC = register(DatasetSpec(
    CUSTOM_DATASET, f"your own data: prompt/completion or chat rows from --data_dir/--data_files (JSONL, CSV, "
    f"Parquet) or {HUB_PREFIX}ORG/NAME[:CONFIG]; --metrics {'/'.join(DEFAULT_TEXT_METRICS)}/accuracy",
    partial(load, CustomData(CUSTOM_DATASET)), EvaluationSpec(partial(score_text_rows, metrics=DEFAULT_TEXT_METRICS),
                                                              stop_strings=()),
    # Analysis split (held out of train for the ablation): 100, not 200 — user files are often a few hundred rows.
    max_new_tokens=128, analysis_samples=100, configure=configure, name_prefix=HUB_PREFIX))
