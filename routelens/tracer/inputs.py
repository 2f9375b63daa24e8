"""Reading trace inputs: `.txt` (one text per line) or `.jsonl` (a `text` field, optional `label`, `lang`,
`align_id`; any other fields are kept as metadata), either optionally gzipped (`.jsonl.gz`). Every problem is one line naming file, line and fix."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from ..errors import InputError
from ..records import SequenceRecord

KNOWN_FIELDS = ("text", "label", "lang", "align_id")


def _decode_line(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
            "re-encode the file as UTF-8"
        ) from None


def _record_from_json(line: str, path: Path, lineno: int, seq_id: int) -> SequenceRecord:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise InputError(f'{path}:{lineno}: needs a string "text" field, e.g. {{"text": "...", "lang": "en"}}')
    if not obj["text"].strip():
        raise InputError(f'{path}:{lineno}: "text" is empty; remove the line or give it text')
    opt = {k: (None if obj.get(k) is None else str(obj[k])) for k in KNOWN_FIELDS[1:]}
    meta = {k: v for k, v in obj.items() if k not in KNOWN_FIELDS}
    return SequenceRecord(seq_id=seq_id, text=obj["text"], source_line=lineno, meta=meta, **opt)


def read_inputs(path: str | Path) -> list[SequenceRecord]:
    """Read a trace input file into SequenceRecords with seq_id = 0-based index of the text in the file.

    seq_ids are positions in the file (not in a shard), so shards of one run written by different
    processes never collide and merge by plain union.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input file {path} does not exist; pass a .txt (one text per line) or .jsonl file")
    if path.is_dir():
        raise InputError(f"input {path} is a directory; pass a .txt or .jsonl file")
    suffixes = [x.lower() for x in path.suffixes]
    compressed = suffixes[-1:] == [".gz"]
    kind = suffixes[-2] if compressed and len(suffixes) > 1 else path.suffix.lower()
    is_jsonl = kind in (".jsonl", ".ndjson")
    data = path.read_bytes()
    if compressed:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise InputError(f"{path} is not a readable gzip file ({exc}); pass plain .txt/.jsonl or valid .gz") from None
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()  # a trailing newline is not an empty text
    records: list[SequenceRecord] = []
    for lineno, raw in enumerate(raw_lines, start=1):
        line = _decode_line(raw.rstrip(b"\r"), path, lineno)
        if is_jsonl:
            if not line.strip():
                raise InputError(f"{path}:{lineno}: empty line; remove it (each line must be one JSON object)")
            records.append(_record_from_json(line, path, lineno, len(records)))
        else:
            if not line.strip():
                raise InputError(f"{path}:{lineno}: empty line; remove it (each line is one text to trace)")
            records.append(SequenceRecord(seq_id=len(records), text=line, source_line=lineno))
    if not records:
        raise InputError(f"input file {path} is empty; put one text per line (.txt) or one JSON object per line (.jsonl)")
    return records


def records_from_texts(texts) -> list[SequenceRecord]:
    """Wrap Python strings (or ready SequenceRecords) passed to `routelens.trace`."""
    if isinstance(texts, str):
        texts = [texts]
    out: list[SequenceRecord] = []
    for i, t in enumerate(texts):
        if isinstance(t, SequenceRecord):
            out.append(t)
            continue
        if not isinstance(t, str):
            raise InputError(f"text {i} is a {type(t).__name__}, not a string; pass a list of strings")
        if not t.strip():
            raise InputError(f"text {i} is empty; remove it or give it text")
        out.append(SequenceRecord(seq_id=i, text=t))
    if not out:
        raise InputError("no texts to trace; pass at least one non-empty string")
    return out
