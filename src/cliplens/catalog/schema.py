"""The catalog's tables, version by version: MIGRATIONS[v] brings a catalog from schema v to
v + 1 in one transaction (db.py `Catalog._migrate`), so an old catalog is upgraded in place
the first time a cliplens that writes it opens it.

- 1: files (path, size, mtime, content hash, status), models, embeddings keyed by (model,
  content hash), and meta (the generation counter).
- 2: videos. `files.kind` says whether a file is an image or a video; `frames` holds a
  video's moments by its content hash (so a moved or copied video keeps them), each with
  its time and the key its embeddings are stored under (`<video hash>#<ordinal>`). A
  video's own row in embeddings (under its content hash) is the mean of its moments'
  vectors: what "similar to this video" compares, and the mark that the video was
  embedded whole by that model.
"""

from __future__ import annotations

SCHEMA_VERSION = 2

MIGRATIONS: dict[int, str] = {
    0: """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE files (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL UNIQUE,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        hash TEXT,
        status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
        error TEXT,
        updated_at REAL NOT NULL
    );
    CREATE INDEX files_hash ON files (hash);
    CREATE TABLE models (
        id INTEGER PRIMARY KEY,
        model_id TEXT NOT NULL UNIQUE,
        dim INTEGER NOT NULL
    );
    CREATE TABLE embeddings (
        model INTEGER NOT NULL REFERENCES models (id) ON DELETE CASCADE,
        hash TEXT NOT NULL,
        vector BLOB NOT NULL,
        PRIMARY KEY (model, hash)
    ) WITHOUT ROWID;
    INSERT INTO meta VALUES ('generation', '0');
    """,
    1: """
    ALTER TABLE files ADD COLUMN kind TEXT NOT NULL DEFAULT 'image'
        CHECK (kind IN ('image', 'video'));
    CREATE TABLE frames (
        video TEXT NOT NULL,
        ordinal INTEGER NOT NULL,
        t_ms INTEGER NOT NULL,
        key TEXT NOT NULL UNIQUE,
        PRIMARY KEY (video, ordinal)
    ) WITHOUT ROWID;
    """,
}
