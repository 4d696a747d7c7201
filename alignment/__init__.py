"""multiway-align: multi-way contrastive alignment of multilingual sentence encoders."""

__version__ = "0.1.0"
