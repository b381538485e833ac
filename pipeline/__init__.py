"""The pipeline library: config, storage, shards, training engine, checkpoints, tracking, transfer."""
