"""LP-SAM: SAM with ultrasound adapters and a latent prompt engine (docs/lpsam.md)."""
