"""A benchmark's results as they come: one JSON record per finished piece of work, appended and flushed, so
that a run stopped anywhere picks up after its last finished piece."""
from __future__ import annotations

import json
import os
from pathlib import Path


class Ledger:
    """Records keyed by a string; a key recorded once is done. A last line cut short by a kill is ignored."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the tail of an interrupted write
                self.records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, key: str, record: dict) -> None:
        entry = {"key": key, **record}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            if f.tell() and not self.path.read_bytes().endswith(b"\n"):
                f.write("\n")  # a cut line stays on its own
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[key] = entry
