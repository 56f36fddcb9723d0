"""Tasks: small modules of plain functions over embeddings."""
