"""Logging set-up shared by the roles: one line per event, with the role in every line.

With ``--log-json`` each line is a JSON object; fields passed as ``extra={"silo": ..., "round":
..., "step": ...}`` become keys of their own, so a log pipeline can filter by silo or round.
"""

from __future__ import annotations

import json
import logging
import sys
import time

EVENT_FIELDS = ("silo", "worker", "round", "step", "loss", "reason")


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "role": self.role,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in EVENT_FIELDS:
            if hasattr(record, key):
                doc[key] = getattr(record, key)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure_logging(level: str, role: str, json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter(role))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
