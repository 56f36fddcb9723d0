"""OUT/manifest.json of an embed-dataset job, as `ShardManifest`.

The manifest says what the job embeds (sources, listing, model, sharding) and which
shards are finished; it is rewritten by atomic rename after each shard.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from cliplens.errors import InvalidInputError
from cliplens.store.files import write_atomic

MANIFEST = "manifest.json"
VERSION = 1

StoredDtype = Literal["float16", "float32"]  # of the stored embeddings


@dataclass
class ShardCounts:
    """A finished shard: its embedded rows and its unreadable files."""

    rows: int
    failures: int


# what a resumed job must share with the manifest it finds
RESUME_SETTINGS = (
    "version",
    "model",
    "model_id",
    "dim",
    "dtype",
    "shard_size",
    "files",
    "list_hash",
)


@dataclass
class ShardManifest:
    """OUT/manifest.json: what the job embeds, with which model, and its finished shards.

    Keys an older manifest lacks take their defaults, so every manifest written so far
    opens; `to_dict` writes the same JSON object as always.
    """

    model_id: str
    dim: int
    version: int = VERSION
    model: str | None = None
    dtype: StoredDtype = "float16"
    shard_size: int | None = None
    files: int | None = None
    list_hash: str | None = None
    sources: list[str] = field(default_factory=list)
    shards: dict[str, ShardCounts] = field(default_factory=dict)
    grown: bool = False  # the listing changed since the first run (embed-dataset --add-new)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardManifest:
        known = {f.name for f in fields(cls)} - {"shards"}
        shards = {name: ShardCounts(**counts) for name, counts in d.get("shards", {}).items()}
        return cls(**{k: v for k, v in d.items() if k in known}, shards=shards)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in RESUME_SETTINGS if k != "version"}
        d = {"version": self.version, **d, "sources": self.sources}
        d["shards"] = {name: asdict(counts) for name, counts in self.shards.items()}
        if self.grown:
            d["grown"] = True
        return d


def require_manifest(out: Path) -> ShardManifest:
    """The manifest of a job folder; a clear error when `out` is not one."""
    manifest = read_manifest(out)
    if manifest is None:
        raise InvalidInputError(f"{out}: no {MANIFEST}; give the --out folder of embed-dataset")
    return manifest


def read_manifest(out: Path) -> ShardManifest | None:
    """The manifest of a job folder, None when there is none yet."""
    try:
        return ShardManifest.from_dict(json.loads((out / MANIFEST).read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, AttributeError) as e:
        message = f"{out / MANIFEST}: not a manifest ({e}); use a new `out`"
        raise InvalidInputError(message) from e


def save_manifest(out: Path, manifest: ShardManifest) -> None:
    """Write the manifest by atomic rename."""
    text = json.dumps(manifest.to_dict(), indent=1)
    write_atomic(out / MANIFEST, lambda p: p.write_text(text))
