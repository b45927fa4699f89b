"""Errors raised by the data pipeline."""
from __future__ import annotations


class DataError(ValueError):
    """Data cannot be read or used as configured; the message says where (file, line, record) and how to fix it."""
