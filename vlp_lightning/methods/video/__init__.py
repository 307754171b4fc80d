"""Video-language methods: a per-frame image tower and a text tower in one space (X-CLIP, HecVL) on the shared
`VideoTextMethod`; the index of names stays `vlp_lightning.methods`."""
