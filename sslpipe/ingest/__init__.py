"""Ingest stage: data sets, layouts and generated scenes written as WebDataset shards (`sslpipe shards`)."""
