"""Process-local board of the replicas' latest routing-stats reports.

The affinity router writes it (Ray pickles the router's module by value, so shared state must live in another
module, imported by reference); the ingress's `/metrics` collector reads it. No Ray here.
"""

from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_reports: dict[str, dict[str, Any]] = {}


def publish(reports: dict[str, dict[str, Any]]) -> None:
    """Replace the board with `reports` (replica id -> its last report) for the replicas routed to now."""
    with _lock:
        _reports.clear()
        _reports.update({rid: dict(r) for rid, r in reports.items()})


def latest() -> dict[str, dict[str, Any]]:
    """A copy of the board."""
    with _lock:
        return {rid: dict(r) for rid, r in _reports.items()}
