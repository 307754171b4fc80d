"""Contrastive image-text methods built on CLIP; the index of names stays `vlp_lightning.methods`."""
