# What the Kubernetes side (infra/k8s/render.sh) and the runbook need. No secret values: the
# database password is referenced by its Secret Manager id only.

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

output "mlflow_db_user" {
  description = "PostgreSQL user of the MLflow server."
  value       = google_sql_user.mlflow.name
}

output "mlflow_db_password_secret" {
  description = "Secret Manager secret that holds the MLflow database password (read it with gcloud; it is not an output)."
  value       = google_secret_manager_secret.mlflow_db_password.secret_id
}
