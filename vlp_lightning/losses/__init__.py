"""Pure loss functions, one module per family, with no Lightning inside; import them from their module, e.g.
`from vlp_lightning.losses.contrastive import clip_contrastive_loss`."""
