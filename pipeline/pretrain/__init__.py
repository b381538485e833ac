"""Distributed pretraining of a ViT with Ray Train and DeepSpeed ZeRO, checkpointed to storage, tracked in MLflow.

The package owns:
- ``driver``: the checks before launch and the Ray Train run around ``TorchTrainer.fit()``;
- ``trainer``: what each Ray Train worker (one DeepSpeed rank) does, from resume to export, as a loop of named steps;
- ``engine``: the one place a built model is wrapped for distributed training (DeepSpeed config + initialize);
- ``checkpoints``: saving, finding and loading complete checkpoints, and the exact-resume state (RNG, data position);
- ``ledger``: the per-rank record of which samples each step trained on, for the reliability checks;
- ``stops``: the record that keeps Ray's restarts from training again after a divergence or unreadable data.

Its public entry points are re-exported here: ``check_before_launch`` then ``run`` (after
``pipeline.cluster.connect_ray``).
"""

from pipeline.pretrain.driver import RunResult, check_before_launch, run
from pipeline.pretrain.stops import EXIT_DATA_ERROR, LossNotFiniteError, PermanentDataError
from pipeline.pretrain.trainer import checkpoint_info

__all__ = [
    "EXIT_DATA_ERROR",
    "LossNotFiniteError",
    "PermanentDataError",
    "RunResult",
    "check_before_launch",
    "checkpoint_info",
    "run",
]
