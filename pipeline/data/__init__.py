"""Sharded WebDataset ingestion: writing shard sets, reading them into training batches, and the Ray Data engine."""

from pipeline.data.batches import Batch
from pipeline.data.config import DataConfig, DataError, DataInfo
from pipeline.data.evaluation import EvalLoader, SplitLabels, build_eval_loader, read_labels
from pipeline.data.loader import TrainLoader, build_train_loader
from pipeline.data.ray_engine import RayTrainLoader, build_ray_dataset, ray_datasets
from pipeline.data.shards import read_manifest
from pipeline.data.shardsets import check_data
from pipeline.data.transforms import normalize

__all__ = [
    "Batch",
    "DataConfig",
    "DataError",
    "DataInfo",
    "EvalLoader",
    "RayTrainLoader",
    "SplitLabels",
    "TrainLoader",
    "build_eval_loader",
    "build_ray_dataset",
    "build_train_loader",
    "check_data",
    "normalize",
    "ray_datasets",
    "read_labels",
    "read_manifest",
]
