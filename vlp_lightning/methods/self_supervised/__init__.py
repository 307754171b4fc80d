"""Image-only self-supervised methods on two or more views of each image (SimCLR, MoCo v2 / v3, BYOL, DINO,
Barlow Twins, VICReg); the index of names stays `vlp_lightning.methods`."""
