"""Data layer without Lightning: shards, indices, readers, samplers and the embedded data sets."""
