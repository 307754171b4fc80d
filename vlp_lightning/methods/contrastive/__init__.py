"""Contrastive image-text methods that build on CLIP (`vlp_lightning.methods.clip`) with more than its one loss."""
