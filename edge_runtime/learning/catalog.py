"""A device's memory of its own images, in one SQLite file in its state dir.

- Sample ids come from content: the first 63 bits of the file's BLAKE2b digest. The same
  bytes under any name get the same id, on any restart. Two different files whose ids
  collide (the digests differ, the 63 bits do not) are told apart by the full 256-bit
  digest: the one seen later takes the next free id (id + 1, wrapping below 2**63). Every
  id ever given is remembered, so an id never moves to another image, whatever is added
  or removed later.
- Decoded, resized pixels (uint8 HWC, before normalisation) are kept per content digest
  and preprocessing (``Preprocess.cache_key``): no round, and no restart, decodes a file
  twice. Pixels of images no longer in the folder are dropped at the end of a scan.
- What each path held when last read (size, mtime, inode -> digest), so a rescan only
  stats unchanged files instead of reading them; and which files could not be decoded,
  with why, so a bad file is neither decoded nor reported again until it changes.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

ID_SPACE = 1 << 63  # ids are non-negative int64
SCHEMA = """
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER,
                                  inode INTEGER, digest BLOB, bad TEXT);
CREATE TABLE IF NOT EXISTS samples (digest BLOB PRIMARY KEY, id INTEGER UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS pixels (key TEXT, digest BLOB, data BLOB,
                                   PRIMARY KEY (key, digest));
"""


def content_digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def id_from_digest(digest: bytes) -> int:
    """63 bits of the digest: the sample id unless another image already holds it."""
    return int.from_bytes(digest[:8], "big") >> 1


def stat_key(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino


class ImageCatalog:
    """Ids, cached pixels and file fingerprints of one device (not thread-safe)."""

    def __init__(self, path: str | Path,
                 id_of: Callable[[bytes], int] = id_from_digest) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path))
        self.db.executescript(SCHEMA)
        self.id_of = id_of  # tests inject a colliding one
        self._ids = dict(self.db.execute("SELECT digest, id FROM samples"))
        self._taken = set(self._ids.values())

    def close(self) -> None:
        self.db.close()

    # -- files ---------------------------------------------------------------------------
    def known_file(self, path: str, st: os.stat_result) -> tuple[bytes | None, str | None]:
        """(digest, why it is bad) recorded for ``path`` if it is unchanged since; else
        (None, None): read it again."""
        row = self.db.execute("SELECT size, mtime_ns, inode, digest, bad FROM files "
                              "WHERE path = ?", (path,)).fetchone()
        if row is None or tuple(row[:3]) != stat_key(st):
            return None, None
        return row[3], row[4]

    def remember_file(self, path: str, st: os.stat_result, digest: bytes | None,
                      bad: str | None = None) -> None:
        self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                        (path, *stat_key(st), digest, bad))

    def forget_files_except(self, paths: Iterable[str]) -> None:
        keep = set(paths)
        gone = [(p,) for (p,) in self.db.execute("SELECT path FROM files") if p not in keep]
        self.db.executemany("DELETE FROM files WHERE path = ?", gone)

    # -- ids -----------------------------------------------------------------------------
    def sample_ids(self, digests: Iterable[bytes]) -> dict[bytes, int]:
        """The id of each digest; new digests get theirs (in digest order, so one scan
        gives the same ids whatever order the files were listed in)."""
        digests = set(digests)
        for d in sorted(digests - self._ids.keys()):
            sid = self.id_of(d) % ID_SPACE
            while sid in self._taken:  # a collision: probe to the next free id
                sid = (sid + 1) % ID_SPACE
            self._ids[d] = sid
            self._taken.add(sid)
            self.db.execute("INSERT INTO samples VALUES (?, ?)", (d, sid))
        return {d: self._ids[d] for d in digests}

    # -- pixels --------------------------------------------------------------------------
    def pixel(self, key: str, digest: bytes, shape: tuple[int, ...]) -> np.ndarray | None:
        """The cached uint8 array of ``shape`` for ``digest`` under ``key``, if any."""
        row = self.db.execute("SELECT data FROM pixels WHERE key = ? AND digest = ?",
                              (key, digest)).fetchone()
        if row is None or len(row[0]) != int(np.prod(shape)):
            return None
        return np.frombuffer(row[0], np.uint8).reshape(shape)

    def put_pixels(self, key: str, digest: bytes, arr: np.ndarray) -> None:
        self.db.execute("INSERT OR REPLACE INTO pixels VALUES (?, ?, ?)",
                        (key, digest, np.ascontiguousarray(arr, np.uint8).tobytes()))

    def forget_pixels_except(self, key: str, digests: Iterable[bytes]) -> None:
        """Drop cached pixels of images no longer held (any key: other sizes are stale)."""
        keep = set(digests)
        gone = [(k, d) for k, d in self.db.execute("SELECT key, digest FROM pixels")
                if k != key or d not in keep]
        self.db.executemany("DELETE FROM pixels WHERE key = ? AND digest = ?", gone)

    def commit(self) -> None:
        self.db.commit()
