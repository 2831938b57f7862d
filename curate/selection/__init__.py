"""Selection: score tables in, subsets (uid parquet + DataComp .npy) out."""
