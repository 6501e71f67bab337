"""segjax: semantic segmentation networks in JAX/Flax, at numerical parity with PyTorch."""
__version__ = "0.1.0"
