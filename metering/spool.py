"""The durable spool: every signed batch lands on disk before it counts as taken.

Batches are signed here, as they enter the spool, so the node's hash chain is exactly what
is on disk: after a restart (or a `kill -9`) the next batch continues from the stored head,
never reusing a sequence number. The spool is SQLite in WAL mode with `synchronous=FULL`:
a batch is appended in one transaction that is fsynced before `append` returns. Batches
stay until the API has acknowledged them (`mark_shipped`); the last shipped batch of each
key is kept as the chain head. Batches the API refused are kept as evidence, marked.

When the spool cannot grow (the disk, or the configured size limit, is full) the records
are lost, but not silently: the span they covered is remembered and, as soon as there is
room, a signed gap marker for it goes into the chain before the next records. The
settlement counts those seconds as unmetered.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gpudelivery import batches, signing
from gpudelivery.metering import errors

__all__ = ["PENDING", "REJECTED", "SHIPPED", "Spool"]

# States of a spooled batch.
PENDING = "pending"
SHIPPED = "shipped"
REJECTED = "rejected"
# Bumped when the table layout changes; kept in SQLite's user_version.
SCHEMA_VERSION = 1
# Why records went missing, as the gap marker says.
GAP_REASON = "meter spool full: records of this span were lost"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    key_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    document BLOB NOT NULL,  -- the signed batch's canonical bytes
    state TEXT NOT NULL DEFAULT 'pending',
    detail TEXT,
    PRIMARY KEY (key_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batches_by_state ON batches (state, key_id, seq);
"""


def _is_full(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(exc)
    )


class Spool:
    """One node's spool of signed meter batches, in a SQLite file."""

    def __init__(
        self, path: Path, *, node: str, key: signing.SigningKey, max_bytes: int | None = None
    ) -> None:
        self.node = node
        self.key = key
        self._lock = threading.Lock()
        self._lost: tuple[int, int] | None = None
        self._head: tuple[int, str] | None = None
        self._head_known = False
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise errors.MeteringError(
                    f"{path}: spool schema version {version} is newer than this agent's "
                    f"({SCHEMA_VERSION})"
                )
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            if max_bytes is not None:
                page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
                self._db.execute(f"PRAGMA max_page_count={max(1, max_bytes // page_size)}")
        except sqlite3.Error as exc:
            raise errors.MeteringError(f"{path}: cannot open the spool: {exc}") from exc

    @property
    def lost_span(self) -> tuple[int, int] | None:
        """The span whose records were lost and are not yet covered by a gap marker."""
        return self._lost

    def head(self) -> tuple[int, str] | None:
        """(seq, hash) of the last batch of the current key's chain."""
        row = self._db.execute(
            "SELECT seq, hash FROM batches WHERE key_id = ? ORDER BY seq DESC LIMIT 1",
            (self.key.key_id,),
        ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def _append(self, records: Sequence[dict[str, Any]], gap: batches.Gap | None) -> dict[str, Any]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            # The chain's head is read once, then kept: this process is its only writer.
            if not self._head_known:
                self._head, self._head_known = self.head(), True
            head = self._head
            signed = batches.sign_batch_and_hash(
                key=self.key,
                node=self.node,
                seq=0 if head is None else head[0] + 1,
                prev_hash=None if head is None else head[1],
                records=records,
                gap=gap,
                plain_records=True,
            )
            self._db.execute(
                "INSERT INTO batches (key_id, seq, hash, document) VALUES (?, ?, ?, ?)",
                (
                    self.key.key_id,
                    signed.document["seq"],
                    signed.hash,
                    signed.canonical,  # stored as the signed bytes (a BLOB)
                ),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._head_known = False  # whatever happened, ask the file next time
            self._rollback()
            raise
        self._head = (signed.document["seq"], signed.hash)
        return signed.document

    def _rollback(self) -> None:
        # SQLite may already have rolled back (a commit that hit a full disk does).
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def append(
        self, records: Sequence[dict[str, Any]], *, span: tuple[int, int]
    ) -> dict[str, Any] | None:
        """Sign `records` (covering `span`) into the chain and store them durably.

        The records are metering.records' own: plain JSON by construction, so they are
        signed without a second check.

        Returns the batch, or None when the spool is full: the span is then remembered for
        a gap marker, written first by the next append that finds room.
        """
        with self._lock:
            try:
                if self._lost is not None:
                    self._append([], batches.Gap(*self._lost, GAP_REASON))
                    self._lost = None
                return self._append(records, None)
            except sqlite3.Error as exc:
                if not _is_full(exc):
                    raise errors.MeteringError(f"spool write failed: {exc}") from exc
                start = span[0] if self._lost is None else min(self._lost[0], span[0])
                end = span[1] if self._lost is None else max(self._lost[1], span[1])
                self._lost = (start, end)
                return None

    def pending(self, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` unshipped batches of every key, in chain order."""
        rows = self._db.execute(
            "SELECT document FROM batches WHERE state = ? ORDER BY key_id, seq LIMIT ?",
            (PENDING, limit),
        ).fetchall()
        return [json.loads(row[0]) for row in rows]

    def depth(self) -> int:
        """How many batches wait to be shipped."""
        return int(
            self._db.execute("SELECT count(*) FROM batches WHERE state = ?", (PENDING,)).fetchone()[
                0
            ]
        )

    def mark(
        self, key_seqs: Iterable[tuple[str, int]], state: str, detail: str | None = None
    ) -> None:
        """Set the state of batches, then drop shipped ones but each key's last."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "UPDATE batches SET state = ?, detail = ? WHERE key_id = ? AND seq = ?",
                    [(state, detail, key_id, seq) for key_id, seq in key_seqs],
                )
                self._db.execute(
                    "DELETE FROM batches WHERE state = ? AND seq < "
                    "(SELECT max(seq) FROM batches AS later WHERE later.key_id = batches.key_id)",
                    (SHIPPED,),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def count(self, state: str) -> int:
        return int(
            self._db.execute("SELECT count(*) FROM batches WHERE state = ?", (state,)).fetchone()[0]
        )

    def close(self) -> None:
        self._db.close()
