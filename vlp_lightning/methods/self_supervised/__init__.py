"""Image-only self-supervised methods on two or more views of each image (SimCLR, MoCo v2 / v3, BYOL, DINO,
Barlow Twins, VICReg, MMC) and the label-using pretraining methods built on the same blocks (LOOK, HVP); the index
of names stays `vlp_lightning.methods`."""
