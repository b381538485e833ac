# What the Kubernetes side (infra/k8s/render.sh) and the runbook need. No secret values: MLflow
# has no database password (IAM database authentication), and the Redis AUTH string is read with
# gcloud when the runbook creates its Secret.

output "project_id" {
  description = "Project that holds everything."
  value       = var.project_id
}

output "region" {
  description = "Region of the cluster, database and buckets."
  value       = var.region
}

output "cluster_name" {
  description = "GKE cluster name."
  value       = google_container_cluster.main.name
}

output "get_credentials_command" {
  description = "Command that writes kubectl credentials for the cluster."
  value       = "gcloud container clusters get-credentials ${google_container_cluster.main.name} --region ${var.region} --project ${var.project_id}"
}

output "k8s_namespace" {
  description = "Namespace the Kubernetes manifests must use (Workload Identity is bound to it)."
  value       = var.k8s_namespace
}

output "image_registry" {
  description = "Artifact Registry path to push the project images to (REGISTRY in infra/k8s/render.sh)."
  value       = local.image_registry
}

output "shards_bucket" {
  description = "Bucket for WebDataset shards (use gs://<value>/<dataset>/...)."
  value       = google_storage_bucket.shards.name
}

output "checkpoints_bucket" {
  description = "Bucket for training checkpoints."
  value       = google_storage_bucket.checkpoints.name
}

output "mlflow_artifacts_bucket" {
  description = "Bucket the MLflow server stores artifacts in (--artifacts-destination)."
  value       = google_storage_bucket.mlflow_artifacts.name
}

output "ray_service_account_email" {
  description = "Google service account the Ray Kubernetes service account is bound to (iam.gke.io/gcp-service-account annotation)."
  value       = google_service_account.ray.email
}

output "mlflow_service_account_email" {
  description = "Google service account the MLflow Kubernetes service account is bound to."
  value       = google_service_account.mlflow.email
}

output "cloudsql_connection_name" {
  description = "Instance connection name (project:region:instance) for the Cloud SQL Auth Proxy."
  value       = google_sql_database_instance.mlflow.connection_name
}

output "mlflow_namespace" {
  description = "Namespace of the MLflow server (its Workload Identity binding names it)."
  value       = var.mlflow_namespace
}

output "mlflow_db_user" {
  description = "PostgreSQL user of the MLflow server: its service account, logged in through IAM database authentication."
  value       = google_sql_user.mlflow.name
}

output "redis_instance" {
  description = "Memorystore instance that keeps Ray's GCS state (read its AUTH string with `gcloud redis instances get-auth-string`)."
  value       = google_redis_instance.ray_gcs.name
}

output "redis_address" {
  description = "host:port of the Memorystore instance for Ray GCS fault tolerance (rediss://, TLS)."
  value       = "${google_redis_instance.ray_gcs.host}:${google_redis_instance.ray_gcs.port}"
}

output "redis_ca_certificate" {
  description = "CA certificate of the Memorystore TLS endpoint (public, not a secret): Ray verifies the server with it."
  value       = google_redis_instance.ray_gcs.server_ca_certs[0].cert
}

output "private_services_cidr" {
  description = "Peered range that holds the private IPs of Cloud SQL and Memorystore (egress NetworkPolicies allow it)."
  value       = "${google_compute_global_address.private_services.address}/${google_compute_global_address.private_services.prefix_length}"
}
