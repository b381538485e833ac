# Names and labels derived from the variables, computed once so every file agrees on them.
locals {
  # (GKE adds goog-k8s-cluster-name to its own resources, so the cluster name is not repeated here.)
  labels = merge(
    {
      app        = "vitpipe"
      managed-by = "terraform"
    },
    var.labels,
  )

  # Bucket names are global across all of GCS, so they are prefixed with the project id. With the
  # length limits of project_id (30) and cluster_name (19) and the longest suffix (12), names stay
  # within GCS's 63 characters; storage.tf checks each name again before creating it.
  bucket_prefix = "${var.project_id}-${var.cluster_name}"
  bucket_names = {
    access_logs      = "${local.bucket_prefix}-access-logs"
    shards           = "${local.bucket_prefix}-shards"
    checkpoints      = "${local.bucket_prefix}-checkpoints"
    mlflow_artifacts = "${local.bucket_prefix}-mlflow"
  }

  # The Workload Identity pool of this project: Kubernetes service accounts appear in IAM as
  # serviceAccount:<project>.svc.id.goog[<namespace>/<ksa>].
  workload_pool = "${var.project_id}.svc.id.goog"

  ray_ksa_member    = "serviceAccount:${local.workload_pool}[${var.k8s_namespace}/${var.ray_ksa_name}]"
  mlflow_ksa_member = "serviceAccount:${local.workload_pool}[${var.mlflow_namespace}/${var.mlflow_ksa_name}]"

  # Cloud SQL IAM database user of the MLflow service account: its e-mail without the domain suffix.
  mlflow_db_user = trimsuffix(google_service_account.mlflow.email, ".gserviceaccount.com")

  # private.googleapis.com (network.tf): the only internet addresses Pods may reach.
  private_googleapis_ips = ["199.36.153.8", "199.36.153.9", "199.36.153.10", "199.36.153.11"]

  # Reservation use per capacity choice (node_pools.tf).
  gpu_reservation_type = lookup({
    ON_DEMAND  = "ANY_RESERVATION"
    RESERVATION = "SPECIFIC_RESERVATION"
  }, var.gpu_provisioning, "NO_RESERVATION")
  # Dynamic Workload Scheduler modes (flex-start, queued provisioning).
  gpu_dws = contains(["FLEX_START", "QUEUED_PROVISIONING"], var.gpu_provisioning)

  # Images from outside this stack's registry that Binary Authorization admits (binauthz.tf), exactly
  # as pinned in infra/k8s (tests/test_infra_consistency.py keeps both in step).
  external_images = [
    "gcr.io/cloud-sql-connectors/cloud-sql-proxy:2.14.2",
    "quay.io/kuberay/operator:v1.7.0",
    "registry.k8s.io/kueue/kueue:v0.13.4",
  ]

  # Where `docker push` sends the project's images.
  image_registry = "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}"
}
