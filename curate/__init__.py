"""curate: curate and debias image-text pretraining sets for CLIP-style models."""

__version__ = "0.1.0"
