"""A rollback and what it did: which sources left the ledger (and may be folded again), which came back.

``basis rollback`` runs it in the command's own process while no daemon runs, and the daemon runs it
for the ``basis.rollback`` control op; both print the same report (``render.rollback_lines``).
"""

from __future__ import annotations

from typing import Any

from axis_stream.store.basis import Basis
from axis_stream.store.records import FoldRecord


def rollback(basis: Basis, version: int) -> dict[str, Any]:
    """Make ``version`` current again (``Basis.rollback``, under the basis lock) and report the change
    against the version that was current when the lock was got, as JSON-able data."""
    new = basis.rollback(version)
    manifest = basis.manifest_of(new)
    previous = manifest.get("parent") if manifest.get("restored_from") == version else new
    before = basis.ledger(previous) if previous is not None else []
    after = basis.ledger(new)
    kept, had = {r.version for r in after}, {r.version for r in before}
    return {"version": new, "restored": version, "previous": previous, "count": int(manifest["count"]),
            "removed": [_source(r) for r in before if r.version not in kept],
            "returned": [_source(r) for r in after if r.version not in had]}


def _source(record: FoldRecord) -> dict[str, Any]:
    return {"version": record.version, "file": record.file, "sha256": record.sha256}
