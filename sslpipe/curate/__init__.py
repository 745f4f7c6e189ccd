"""Curating a raw image pool before pretraining on it: near-duplicate removal, hierarchical k-means with resampling and
balanced sampling (Vo et al. 2024), and the curated shard set."""
