"""Data layer: dataset discovery, packing into memory-mapped arrays, augmentation, datasets, samplers."""
