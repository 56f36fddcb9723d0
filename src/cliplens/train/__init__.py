"""Training: image-caption readers, contrastive losses, the loop every trainer shares (time
limit, atomic checkpoints, exact resume), CLIP training and corruption-robust towers."""
