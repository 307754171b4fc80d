"""Video methods. On the shared `VideoTextMethod` (a per-frame image tower and a text tower in one space): X-CLIP,
HecVL, OphCLIP, TemAdapter. With their own video encoders: VIOLET (a video transformer and a fusion encoder),
GFSLT-VLP (a frame-sequence encoder and a text decoder), SIGMA (masked video modelling on a space-time ViT; `target:
pixels` is VideoMAE) and VEDIT (latent prediction on a frozen tower). PLLaVA, the frozen-LM family's video member,
lives with that family (`methods.language.pllava`). The index of names stays `vlp_lightning.methods`."""
