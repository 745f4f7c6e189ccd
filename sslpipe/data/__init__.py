"""Data stage: what training reads: the shard manifest and stream, views, masks, collation and targets."""
