"""Completion markers: how every step says "done, for this spec" and refuses another spec's output.

A step writes its files first and a marker last (`_SUCCESS.json`, or the partition manifest), with
the fit's fingerprint. A reader trusts only a marker with its own fingerprint, so a crash never
leaves something that looks complete, and a retried step with the same spec returns at once. A
marker with another fingerprint is refused, never overwritten: a changed fit goes elsewhere.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from ..contract import strict_json
from ..errors import BadInput
from .storage import NotFound, Store

def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_fingerprint(document: dict, fingerprint: str, where: str) -> None:
    """Refuse a marker written for another spec."""
    if document.get("fingerprint") != fingerprint:
        raise BadInput(
            f"{where} was completed for another spec (fingerprint {document.get('fingerprint')}, "
            f"this fit {fingerprint}); write a changed fit elsewhere"
        )


def read_json(store: Store, key: str) -> dict | None:
    """The JSON document at `key`, or None if there is none."""
    try:
        return json.loads(store.read_bytes(key))
    except NotFound:
        return None


def completed(store: Store, marker: str, fingerprint: str) -> dict | None:
    """The marker (a key, `Folder.marker` of runner/layout.py) of a finished step with this
    fingerprint; None if the step has not finished."""
    document = read_json(store, marker)
    if document is not None:
        check_fingerprint(document, fingerprint, store.uri(marker))
    return document


def write_output(store: Store, key: str, data: bytes) -> int:
    """Write one of a step's files; its size, for the marker that vouches for it."""
    store.write_bytes(key, data)
    return len(data)


def mark_complete(store: Store, marker: str, fingerprint: str, files: dict[str, int], **extra) -> dict:
    """Write the marker naming the step's files (relative to its folder) and their sizes: the
    step is complete."""
    document = {"fingerprint": fingerprint, "files": files, **extra, "finished": now()}
    store.write_bytes(marker, strict_json(document, indent=1, ensure_ascii=False).encode())
    return document
