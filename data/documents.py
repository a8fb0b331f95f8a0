"""Reading raw documents from disk: JSONL (one per line) or plain text (one per file)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def read_documents(files: Iterable[str | os.PathLike], *, text_key: str = "text") -> Iterator[str]:
    """Yield the documents of `files` in order, skipping empty ones.

    A file ending in .jsonl/.json/.ndjson holds one JSON object per line with the text under
    `text_key`; any other file is one document. Undecodable bytes become U+FFFD rather than
    aborting a long run over one bad file.
    """
    for path in files:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"--input {path!r} is not a file")
        if path.endswith(JSONL_SUFFIXES):
            with open(path, encoding="utf-8", errors="replace") as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{lineno}: not a JSON object ({err})") from err
                    if not isinstance(record, dict) or text_key not in record:
                        raise ValueError(
                            f"{path}:{lineno}: no {text_key!r} field; pass --text-key with the "
                            "name of the field holding the document text"
                        )
                    text = record[text_key]
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{lineno}: field {text_key!r} is not a string")
                    if text:
                        yield text
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            if text:
                yield text
