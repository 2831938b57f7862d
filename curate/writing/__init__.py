"""Writing curated WebDataset shards: verbatim sample bytes, deterministic tars, resumable."""
