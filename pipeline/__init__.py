"""EO→SAR object classification pipeline (PBVS MAVOC SAR track)."""

__version__ = "0.1.0"
