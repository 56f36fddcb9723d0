"""Training: data readers, contrastive losses, the CLIP training loop."""
