"""abp: attention-based pooling (ABP) for atomistic neural networks."""
__version__ = "0.1.0"
