"""Data: packing (HDF5), shards (WebDataset), the shapes dataset, feature caches, tokenizers and word maps."""
