"""The photo catalog: SQLite rows of files and embeddings, its vectors, and updating it."""
