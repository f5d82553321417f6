"""sdbatch: distributed, reproducible batch rendering for Stable Diffusion on Ray Data."""

__version__ = "0.1.0"
