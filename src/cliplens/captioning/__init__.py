"""Captioning with a CLIP prefix (ClipCap): the model, its language models, pairs embedded
once, training, evaluation and the caption metrics."""
