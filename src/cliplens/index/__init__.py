"""Faiss indexes built over embed-dataset shards (`cliplens build-index`), and opening them."""
