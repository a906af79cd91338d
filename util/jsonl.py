"""Reading a JSON-lines log (``log.jsonl``) the way the trainer writes and cleans it.

Kept apart from ``util.logger`` so that tools that only read logs (scripts/summarize.py) read them
exactly as main.py does without importing torch.
"""
import json
import os
from typing import Dict, List, Optional


def parse_line(raw: bytes) -> Optional[Dict]:
    """One log line as a record; None for a line that is not a JSON object in UTF-8 (a write cut
    short by a kill, a stray byte from a full disk or another program)."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def read_jsonl(path: str) -> List[Dict]:
    """The records of a JSON-lines log; unreadable lines (see ``parse_line``) are skipped."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        return [record for record in map(parse_line, f) if record is not None]
