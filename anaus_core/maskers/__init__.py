"""Mask sources: labels, k-means, Felzenszwalb, vanilla SAM, LP-SAM (see ``build_masker``)."""
