"""Captioning with a CLIP prefix (ClipCap): model, language models, metrics."""
