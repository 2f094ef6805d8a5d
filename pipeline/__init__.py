"""Offline stages of the mask-precompute job: ingest, mask, pyramid, pack; fingerprints; executors."""
