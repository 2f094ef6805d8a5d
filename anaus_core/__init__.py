"""AnaUS core library: models, losses, augmentations, optimisation, metrics, phantoms.

Pure library code: imports neither ``pipeline`` nor ``shards``.
"""

__version__ = "0.1.0"
