"""Storage: the SQLite catalog of files and embeddings, and vector search over it."""
