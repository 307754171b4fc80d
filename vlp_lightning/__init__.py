"""vlp_lightning: a PyTorch Lightning suite for vision and vision-language pretraining."""

__version__ = "0.1.0"
