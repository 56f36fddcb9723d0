"""CLIP-guided image synthesis: the optimisation loop and its prompts (`generate.py`), the
generators it optimises (`FourierImage` there, `vqgan.py`'s VQGAN latents) and what an
optimised image may cost (`image_budget.py`)."""
