"""Small datasets for tests, demos and docs, made or installed, never downloaded."""
