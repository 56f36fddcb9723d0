"""Files cliplens writes beside its data: atomic writes (files.py), small arrays (npz.py)."""
