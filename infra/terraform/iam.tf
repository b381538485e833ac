# Identities and least-privilege access.
#
# - nodes:  the node VMs' service account (logs, metrics, image pulls), never the Compute
#           Engine default account, which has project Editor.
# - ray:    what Ray Pods (head, workers, job submitters) act as through Workload Identity:
#           read/write objects in the shards and checkpoints buckets, nothing else.
# - mlflow: what the MLflow server acts as: objects in the artifacts bucket, and connecting and
#           logging in (IAM database authentication) to its own Cloud SQL instance.
# Bucket roles are granted on each bucket, never project-wide, and no service account key is
# ever created: Pods get short-lived tokens from the GKE metadata server.

# --- Node service account ---------------------------------------------------------------------

resource "google_service_account" "nodes" {
  account_id   = "${var.cluster_name}-nodes"
  display_name = "GKE nodes of ${var.cluster_name}"

  depends_on = [google_project_service.apis]
}

# The predefined role Google recommends for custom node service accounts: write logs and
# metrics, read node metadata. Nothing else.
resource "google_project_iam_member" "nodes_default" {
  project = var.project_id
  role    = "roles/container.defaultNodeServiceAccount"
  member  = "serviceAccount:${google_service_account.nodes.email}"
}

resource "google_artifact_registry_repository_iam_member" "nodes_pull" {
  project    = var.project_id
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${google_service_account.nodes.email}"
}

# --- Ray --------------------------------------------------------------------------------------

resource "google_service_account" "ray" {
  account_id   = "${var.cluster_name}-ray"
  display_name = "Ray Pods of ${var.cluster_name} (Workload Identity)"

  depends_on = [google_project_service.apis]
}

# objectUser = create, read, overwrite, delete and list objects; no bucket or IAM changes.
# Shards are written by jobs/prepare_data.py running on the cluster, hence not read-only.
resource "google_storage_bucket_iam_member" "ray_shards" {
  bucket = google_storage_bucket.shards.name
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.ray.email}"
}

# Checkpoint rotation deletes old checkpoints, so delete is needed here too.
resource "google_storage_bucket_iam_member" "ray_checkpoints" {
  bucket = google_storage_bucket.checkpoints.name
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.ray.email}"
}

# Lets exactly one Kubernetes service account (namespace/name) act as the Ray service account.
resource "google_service_account_iam_member" "ray_workload_identity" {
  service_account_id = google_service_account.ray.name
  role               = "roles/iam.workloadIdentityUser"
  member             = local.ray_ksa_member

  # The workload pool exists only once the cluster does.
  depends_on = [google_container_cluster.main]
}

# --- MLflow -----------------------------------------------------------------------------------

resource "google_service_account" "mlflow" {
  account_id   = "${var.cluster_name}-mlflow"
  display_name = "MLflow tracking server of ${var.cluster_name} (Workload Identity)"

  depends_on = [google_project_service.apis]
}

resource "google_storage_bucket_iam_member" "mlflow_artifacts" {
  bucket = google_storage_bucket.mlflow_artifacts.name
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.mlflow.email}"
}

# The Auth Proxy needs cloudsql.client; the condition narrows it to this one instance.
resource "google_project_iam_member" "mlflow_cloudsql_client" {
  project = var.project_id
  role    = "roles/cloudsql.client"
  member  = "serviceAccount:${google_service_account.mlflow.email}"

  condition {
    title       = "only-the-mlflow-instance"
    description = "Connect to the MLflow backend instance only."
    expression  = "resource.name == 'projects/${var.project_id}/instances/${google_sql_database_instance.mlflow.name}' && resource.service == 'sqladmin.googleapis.com'"
  }
}

# Logging in to the instance as an IAM database user (no password), again this instance only.
resource "google_project_iam_member" "mlflow_cloudsql_instance_user" {
  project = var.project_id
  role    = "roles/cloudsql.instanceUser"
  member  = "serviceAccount:${google_service_account.mlflow.email}"

  condition {
    title       = "only-the-mlflow-instance"
    description = "Log in to the MLflow backend instance only."
    expression  = "resource.name == 'projects/${var.project_id}/instances/${google_sql_database_instance.mlflow.name}' && resource.service == 'sqladmin.googleapis.com'"
  }
}

resource "google_service_account_iam_member" "mlflow_workload_identity" {
  service_account_id = google_service_account.mlflow.name
  role               = "roles/iam.workloadIdentityUser"
  member             = local.mlflow_ksa_member

  depends_on = [google_container_cluster.main]
}
