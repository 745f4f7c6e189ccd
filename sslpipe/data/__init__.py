"""Data stage: bundled data sets and WebDataset shard writing (see docs/internals.md §1)."""
