"""tagi-ds: TAGI hypernetwork training."""
__version__ = "0.1.0"
