"""Executors run `run_shard` over the shards: in-process threads today, Ray next."""
