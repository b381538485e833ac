"""Sharded WebDataset ingestion: writing shard sets, reading them into training batches, and the Ray Data engine."""

from pipeline.data.config import DataConfig, DataError, DataInfo
from pipeline.data.shards import read_manifest
from pipeline.data.transforms import normalize

__all__ = ["DataConfig", "DataError", "DataInfo", "normalize", "read_manifest"]
