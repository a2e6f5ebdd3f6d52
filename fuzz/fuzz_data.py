"""Coverage-guided fuzzing of the dataset parsers: `decode_text_file`, `parse_phrasebank` and `load_examples` on
CSV / TSV / JSONL / JSON / sentence@label / Parquet files made of the fuzzer's bytes.

Oracle: `Examples` that hold together (texts non-empty and stripped, labels in range, two classes or more), or a
DataError; never another exception.
    python fuzz/fuzz_data.py -atheris_runs=20000
"""

import json
import sys

import atheris
from common import json_value, write

with atheris.instrument_imports(include=["ia3"]):
    from ia3.recipe.data import PHRASEBANK_LABELS, DataError, decode_text_file, load_examples, parse_phrasebank

SUFFIXES = [".csv", ".tsv", ".jsonl", ".json", ".txt", ".parquet"]
HEADERS = [b"text,label\n", b"text\tlabel\n", b"label,text\n", b'{"text": "', b"[", b""]
LABELS = [
    *PHRASEBANK_LABELS,
    "0",
    "1",
    "2",
    "7",
    "-1",
    "--1",
    "\u00b2",
    "\u0661",
    "1_0",
    "True",
    " positive ",
    "a",
    "b",
]


def structured(fdp, suffix: str) -> bytes:
    """A file of rows, so that mutations reach the per-row checks."""
    rows = [
        (
            fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 20)),
            fdp.PickValueInList(LABELS) if fdp.ConsumeIntInRange(0, 3) else fdp.ConsumeUnicodeNoSurrogates(5),
        )
        for _ in range(fdp.ConsumeIntInRange(0, 8))
    ]
    if suffix in (".csv", ".tsv"):
        sep = "\t" if suffix == ".tsv" else ","
        quote = lambda v: '"' + v.replace('"', '""') + '"' if any(c in v for c in ',"\n\r\t') else v  # noqa: E731
        text = "\n".join([f"text{sep}label", *(sep.join(map(quote, row)) for row in rows)])
    elif suffix in (".jsonl", ".json"):
        records = [{"text": t, "label": y if fdp.ConsumeBool() else json_value(fdp)} for t, y in rows]
        records += [json_value(fdp) for _ in range(fdp.ConsumeIntInRange(0, 1))]
        text = json.dumps(records) if suffix == ".json" and fdp.ConsumeBool() else "\n".join(map(json.dumps, records))
    else:
        text = "\n".join(f"{t}@{y}" for t, y in rows)
    return text.encode("utf-8") + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4))


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    suffix = fdp.PickValueInList(SUFFIXES)
    label_names = fdp.PickValueInList([None, PHRASEBANK_LABELS, ["a", "b"]])
    if fdp.ConsumeIntInRange(0, 2):
        raw = structured(fdp, suffix)
    else:
        raw = fdp.PickValueInList(HEADERS) + fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        text = decode_text_file(raw, "f")
        assert "\r" not in text and "\x00" not in text
        for sentence, label in parse_phrasebank(text, "f"):
            assert sentence and label and "@" not in label
    except DataError:
        pass
    path = write(f"data{suffix}", raw)
    try:
        result = load_examples(str(path), text_column="text", label_column="label", label_names=label_names)
    except DataError:
        return
    assert len(result.texts) == len(result.labels) > 0
    assert all(isinstance(t, str) and t and t == t.strip() for t in result.texts)
    assert all(isinstance(y, int) and 0 <= y < len(result.label_names) for y in result.labels)
    assert len(set(result.labels)) >= 2


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
