"""sgcl: self-supervised pretraining toolkit for whole-slide pathology images."""

__version__ = "0.1.0"
