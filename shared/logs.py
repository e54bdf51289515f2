"""Logging set-up shared by the roles: one line per event, with the role in every line."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str, role: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
