"""Shared test setup: real local services (GCS emulator, Ray head, MLflow server) on loopback.

Each service fixture lives in its own module under tests/fixtures/ and is re-exported here.
"""

import os
import sys
from pathlib import Path

# Must be set before gcsfs is imported anywhere: otherwise the first access probes the bucket type
# over gRPC and waits about a minute.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")

sys.path.insert(0, str(Path(__file__).parent))

from fixtures.gcs import *  # noqa: F403
from fixtures.mlflow_server import *  # noqa: F403
from fixtures.ray_cluster import *  # noqa: F403
