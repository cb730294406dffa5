"""Deterministic train/test splits by a stable hash of an item's key (not Python's salted hash), so
every machine and every run draws the same, disjoint sides: built-in skills, corpus pairs and
benchmarks alike."""

from __future__ import annotations

import hashlib


def held_out(key: str, fraction: float) -> bool:
    """True for about `fraction` of all keys, the same ones everywhere: the sha256
    of the key decides."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction
