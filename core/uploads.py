"""Parse and validate an uploaded dataset file (CSV, TSV or JSONL).

Every row is checked before anything is stored; errors name the row (1-based,
counting data rows) and the column. Error messages never quote row contents.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass

from core.errors import InvalidFile, InvalidRequest

FORMATS = ("csv", "tsv", "jsonl")
MAX_PROBLEMS = 20


@dataclass(frozen=True)
class ParsedDataset:
    rows: list[dict]  # {"text": str, "label": str | None, "control": str | None}
    columns: list[str]
    labels: list[str]
    controls: list[str]


def detect_format(filename: str | None, declared: str | None) -> str:
    if declared:
        if declared not in FORMATS:
            raise InvalidRequest(f"format must be one of {', '.join(FORMATS)}", param="format")
        return declared
    suffix = (filename or "").rsplit(".", 1)[-1].lower()
    if suffix in FORMATS:
        return suffix
    if suffix == "json":
        return "jsonl"
    raise InvalidRequest("cannot tell the file format from its name; pass format=csv|tsv|jsonl",
                         param="format")


def _decode(data: bytes) -> str:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InvalidFile(f"file is not valid UTF-8 (line {line}, byte {e.start}); "
                          "re-encode it as UTF-8", param="file") from e
    if "\x00" in text:
        raise InvalidFile("file contains NUL bytes; is it a binary file?", param="file")
    return text


def _records(text: str, fmt: str) -> tuple[list[str], list[dict]]:
    if fmt == "jsonl":
        records, columns = [], []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidFile(f"line {i}: not valid JSON ({e.msg})", param="file") from e
            if not isinstance(obj, dict):
                raise InvalidFile(f"line {i}: each line must be a JSON object", param="file")
            for k in obj:
                if k not in columns:
                    columns.append(k)
            records.append(obj)
        return columns, records
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",",
                            quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)
    try:
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        records = []
        for row in reader:
            if None in row:  # more cells than header columns
                raise InvalidFile(f"row {reader.line_num - 1}: more cells than header columns",
                                  param="file")
            records.append(row)
    except csv.Error as e:
        raise InvalidFile(f"row {reader.line_num - 1}: malformed {fmt.upper()} ({e})",
                          param="file") from e
    return columns, records


def _cell(record: dict, column: str) -> str | None:
    value = record.get(column)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return "\x00invalid"
    return str(value).strip()


def parse_dataset(data: bytes, *, fmt: str, task: str, text_fields: list[str],
                  label_field: str | None, control_field: str | None) -> ParsedDataset:
    """Validate every row; return normalised rows (text fields joined by a newline)."""
    if not data.strip():
        raise InvalidFile("file is empty", param="file")
    columns, records = _records(_decode(data), fmt)
    if not records:
        raise InvalidFile("file has no data rows", param="file")
    wanted = {"text_fields": text_fields}
    if label_field:
        wanted["label_field"] = [label_field]
    if control_field:
        wanted["control_field"] = [control_field]
    for param, names in wanted.items():
        missing = [n for n in names if n not in columns]
        if missing:
            raise InvalidRequest(f"column(s) {', '.join(missing)} not in the file "
                                 f"(columns: {', '.join(columns[:20])})", param=param)

    problems: list[str] = []
    rows: list[dict] = []
    for i, record in enumerate(records, start=1):
        parts = []
        for name in text_fields:
            value = _cell(record, name)
            if value == "\x00invalid":
                problems.append(f"row {i}, column {name}: must be a string")
            elif value:
                parts.append(value)
        if not parts:
            problems.append(f"row {i}, column {text_fields[0]}: text is empty")
        label = _cell(record, label_field) if label_field else None
        if label_field and (not label or label == "\x00invalid"):
            problems.append(f"row {i}, column {label_field}: label is missing")
        control = _cell(record, control_field) if control_field else None
        if control_field and (not control or control == "\x00invalid"):
            problems.append(f"row {i}, column {control_field}: control code is missing")
        if len(problems) >= MAX_PROBLEMS:
            break
        rows.append({"text": "\n".join(parts), "label": label, "control": control})
    if problems:
        more = " (first problems only)" if len(problems) >= MAX_PROBLEMS else ""
        raise InvalidFile(f"{len(problems)} invalid row(s){more}: " + "; ".join(problems),
                          param="file", details={"problems": problems})
    labels = sorted({r["label"] for r in rows}) if label_field else []
    if task == "classification" and len(labels) < 2:
        raise InvalidRequest("a classification dataset needs at least 2 distinct labels",
                             param="label_field")
    controls = sorted({r["control"] for r in rows}) if control_field else []
    return ParsedDataset(rows=rows, columns=columns, labels=labels, controls=controls)
