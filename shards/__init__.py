"""On-disk training-data format: WebDataset tar shards, a zarr index and a manifest."""
