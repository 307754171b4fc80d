"""Fusion encoders and text decoders: image-text matching, masked language modelling and captioning on top of (or
instead of) the contrastive dual encoder (ALBEF, CoCa, BUS); the index of names stays `vlp_lightning.methods`."""
