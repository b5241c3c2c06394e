"""raeg-pl: invertible image dataset protection (RAEG) on PyTorch Lightning."""

__version__ = "0.1.0"
