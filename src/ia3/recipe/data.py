"""Labelled text data: the Financial PhraseBank format, local CSV/JSONL/Parquet files and Hub datasets.

Everything ends as an `Examples`: texts, integer labels and the label names, checked for the problems that would
otherwise surface as a confusing crash mid-training.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

PHRASEBANK_LABELS = ["negative", "neutral", "positive"]  # the order of the Hub dataset's ClassLabel
PHRASEBANK_HUB_REPO = "takala/financial_phrasebank"
PHRASEBANK_ZIP = "data/FinancialPhraseBank-v1.0.zip"
PHRASEBANK_SUBSETS = {
    "sentences_allagree": "Sentences_AllAgree.txt",
    "sentences_75agree": "Sentences_75Agree.txt",
    "sentences_66agree": "Sentences_66Agree.txt",
    "sentences_50agree": "Sentences_50Agree.txt",
}
DEMO_DATASET = Path(__file__).resolve().parent.parent / "demo" / "finsent.csv"


class DataError(ValueError):
    """A dataset problem, with the file, line or column to fix."""


@dataclass
class Examples:
    """Texts with integer labels into `label_names`."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> Examples:
        return Examples([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names)

    def class_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.label_names, 0)
        for label in self.labels:
            counts[self.label_names[label]] += 1
        return counts


def decode_text_file(data: bytes, source: str) -> str:
    """UTF-8 when it decodes (a BOM is dropped), else latin-1 (as the PhraseBank ships); line ends normalised."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    if "\x00" in text:
        raise DataError(f"{source} holds NUL bytes: it is a binary file, not text")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_phrasebank(text: str, source: str = "<text>") -> list[tuple[str, str]]:
    """Parse `sentence@label` lines (split on the last `@`; blank lines skipped) into (sentence, label) pairs.

    Raises:
        DataError: a non-blank line without `@`, or with an empty sentence or label, naming the line number.
    """
    rows: list[tuple[str, str]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        sentence, at, label = line.rpartition("@")
        sentence, label = sentence.strip(), label.strip()
        if not at or not sentence or not label:
            raise DataError(f"{source}, line {number}: expected 'sentence@label', got {line[:80]!r}")
        rows.append((sentence, label))
    return rows


def _read_table(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several types for a bad file
            raise DataError(f"{path} is not a readable Parquet file: {err}") from None
    text = decode_text_file(path.read_bytes(), str(path))
    if suffix == ".csv" or suffix == ".tsv":
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        rows = []
        try:
            for row in reader:
                if None in row:
                    raise DataError(f"{path}, line {reader.line_num}: more fields than the header has columns")
                rows.append(row)
        except csv.Error as err:  # e.g. a field over the csv module's size limit
            raise DataError(f"{path}, line {reader.line_num}: unreadable CSV ({err})") from None
        return rows
    if suffix in (".jsonl", ".json"):
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                data = json.loads(text)
            except (ValueError, RecursionError) as err:  # JSONDecodeError, huge integers, deep nesting
                raise DataError(f"{path}: invalid JSON ({err})") from None
            for number, row in enumerate(data, start=1):
                if not isinstance(row, dict):
                    raise DataError(f"{path}, record {number}: expected a JSON object, got {type(row).__name__}")
            return data
        rows = []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as err:  # JSONDecodeError, huge integers, deep nesting
                raise DataError(f"{path}, line {number}: invalid JSON ({getattr(err, 'msg', err)})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
        return rows
    raise DataError(
        f"{path}: unknown file type {suffix!r}; use .csv, .tsv, .jsonl, .json, .parquet or .txt (sentence@label)"
    )


def _is_int(text: str) -> bool:
    """`text` is a plain integer (`-1`, `2`); not `²`, `--1` or `1_0`, which `str.isdigit` or `int` also take."""
    digits = text[1:] if text.startswith("-") else text
    return digits.isascii() and digits.isdigit() and len(digits) < 19


def rows_to_examples(
    rows: list[dict],
    source: str,
    text_column: str,
    label_column: str,
    label_names: list[str] | None,
) -> Examples:
    """Turn records into `Examples`. Labels may be names or integer ids into `label_names`.

    Raises:
        DataError: missing columns, empty texts, unknown label values, no rows, a single class.
    """
    if not rows:
        raise DataError(f"{source} holds no examples")
    columns = set(rows[0])
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        raise DataError(
            f"{source} has no column(s) {missing}; its columns are {sorted(columns)}. "
            "Set data.text_column / data.label_column (flags --text-column / --label-column)."
        )
    raw_labels = [row.get(label_column) for row in rows]
    if label_names is None:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in raw_labels):
            raise DataError(
                f"{source}: column {label_column!r} holds integer labels; name the classes with data.label_names "
                "(flag --label-names), e.g. negative,neutral,positive"
            )
        label_names = sorted({str(v).strip() for v in raw_labels if v is not None and str(v).strip()})
    name_to_id = {name: i for i, name in enumerate(label_names)}
    texts: list[str] = []
    labels: list[int] = []
    for number, (row, value) in enumerate(zip(rows, raw_labels), start=1):
        text = row.get(text_column)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{source}, record {number}: empty or missing text in column {text_column!r}")
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(label_names):
            label = value
        elif isinstance(value, str) and _is_int(value.strip()) and value.strip() not in name_to_id:
            label = int(value.strip())
            if not 0 <= label < len(label_names):
                raise DataError(f"{source}, record {number}: label id {label} is outside 0..{len(label_names) - 1}")
        elif value is not None and str(value).strip() in name_to_id:
            label = name_to_id[str(value).strip()]
        else:
            raise DataError(
                f"{source}, record {number}: unknown label {value!r} in column {label_column!r}; "
                f"known labels: {label_names}"
            )
        texts.append(text.strip())
        labels.append(label)
    examples = Examples(texts, labels, list(label_names))
    present = [name for name, count in examples.class_counts().items() if count]
    if len(present) < 2:
        raise DataError(f"{source}: every example has label {present}; a classifier needs at least two classes")
    return examples


def load_phrasebank_file(path: Path, label_names: list[str] | None = None) -> Examples:
    rows = parse_phrasebank(decode_text_file(path.read_bytes(), str(path)), str(path))
    records = [{"sentence": s, "label": label} for s, label in rows]
    return rows_to_examples(records, str(path), "sentence", "label", label_names or PHRASEBANK_LABELS)


def load_phrasebank_hub(subset: str, revision: str | None = None) -> Examples:
    """The `financial_phrasebank` Hub dataset, read from its original zip file (current `datasets` releases no
    longer run the dataset's loading script)."""
    if subset not in PHRASEBANK_SUBSETS:
        raise DataError(f"financial_phrasebank has subsets {sorted(PHRASEBANK_SUBSETS)}; got {subset!r} (data.subset)")
    from huggingface_hub import hf_hub_download

    archive = hf_hub_download(PHRASEBANK_HUB_REPO, PHRASEBANK_ZIP, repo_type="dataset", revision=revision)
    with zipfile.ZipFile(archive) as zf:
        member = next((n for n in zf.namelist() if n.endswith("/" + PHRASEBANK_SUBSETS[subset])), None)
        if member is None:
            raise DataError(f"{archive} has no {PHRASEBANK_SUBSETS[subset]}")
        text = decode_text_file(zf.read(member), member)
    records = [{"sentence": s, "label": label} for s, label in parse_phrasebank(text, member)]
    return rows_to_examples(records, member, "sentence", "label", PHRASEBANK_LABELS)


def load_examples(
    dataset: str,
    *,
    subset: str | None = None,
    split: str = "train",
    text_column: str = "text",
    label_column: str = "label",
    label_names: list[str] | None = None,
) -> Examples:
    """Load `dataset`: `"demo"` (the bundled set), a local file (.txt in `sentence@label` format, .csv, .tsv,
    .jsonl, .json, .parquet), `"financial_phrasebank"`, or any Hub dataset name (through `datasets`)."""
    if dataset == "demo":
        dataset = str(DEMO_DATASET)
    path = Path(dataset).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".txt":
            return load_phrasebank_file(path, label_names)
        return rows_to_examples(_read_table(path), str(path), text_column, label_column, label_names)
    if path.exists():
        raise DataError(f"{dataset} is a folder; pass the data file inside it")
    if dataset in ("financial_phrasebank", PHRASEBANK_HUB_REPO):
        return load_phrasebank_hub(subset or "sentences_allagree")
    if dataset.endswith((".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt")):
        raise DataError(f"Data file {dataset} does not exist")
    import datasets

    ds = datasets.load_dataset(dataset, subset, split=split)
    if label_names is None and label_column in ds.features and hasattr(ds.features[label_column], "names"):
        label_names = list(ds.features[label_column].names)
    return rows_to_examples(ds.to_list(), f"{dataset}[{split}]", text_column, label_column, label_names)


def train_val_split(examples: Examples, val_fraction: float, seed: int) -> tuple[Examples, Examples]:
    """Shuffle with `seed` and hold out `val_fraction` (at least one example on each side; 0: no validation)."""
    if val_fraction == 0:
        return examples, examples.subset([])
    if not 0 < val_fraction < 1:
        raise DataError(f"--data.val_split must be at least 0 and below 1; got {val_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, math.ceil(len(order) * val_fraction))  # as datasets.train_test_split(test_size=...)
    if n_val >= len(order):
        raise DataError(f"{len(order)} examples are too few to hold out {val_fraction:.0%} for validation")
    return examples.subset(sorted(order[n_val:])), examples.subset(sorted(order[:n_val]))
