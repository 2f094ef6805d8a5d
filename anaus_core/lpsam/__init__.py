"""LP-SAM: SAM with ultrasound adapters and a latent prompt engine (SPEC.md §2, docs/lpsam.md)."""
