"""Helpers shared by test modules."""

from __future__ import annotations

import json
from pathlib import Path

from cliplens.cli.main import main


def run_json(capsys, argv: list[str]):
    """Run the CLI in-process; it must succeed; returns its JSON output."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def built_index_from_catalog(folder: Path, catalog_db: Path, model: str, path_of=str) -> Path:
    """A flat build-index folder over the catalog's own vectors, with each photo's path
    rewritten by `path_of` (a local path, or an object-store URI)."""
    from cliplens.catalog.db import Catalog
    from cliplens.distributed.embed import _write_shard, shard_name
    from cliplens.distributed.manifest import ShardCounts, ShardManifest, save_manifest
    from cliplens.index.build import build_index
    from cliplens.models.ref import ModelRef

    model_id = ModelRef(model).info.model_id
    with Catalog(catalog_db) as cat:
        ids, _, matrix = cat.vectors(model_id)
        paths = cat.paths(ids.tolist())
    rows = [
        {"path": path_of(paths[i]), "size": 1, "sha256": "x", "error": "", "embedding": v}
        for i, v in zip(ids.tolist(), matrix, strict=True)
    ]
    shards = folder / "shards"
    shards.mkdir(parents=True)
    ok, bad = _write_shard(shards, shard_name(0), rows, model_id, "float32")
    done = {shard_name(0): ShardCounts(rows=ok, failures=bad)}
    manifest = ShardManifest(model_id, matrix.shape[1], model=model, shards=done)
    save_manifest(shards, manifest)
    build_index(shards, folder / "index", "flat", queries=3)
    return folder / "index"
