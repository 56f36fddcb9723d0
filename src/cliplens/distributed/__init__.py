"""Beyond one machine: embedding on Ray, Parquet shards."""
