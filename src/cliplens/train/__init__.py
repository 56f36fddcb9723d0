"""Training: data readers, contrastive losses (and, to come, the loop, robust encoders, probes)."""
