"""`cliplens build-index`: faiss indexes over embed-dataset shards (build.py), and the
finished folders, opened and searched (built.py)."""
