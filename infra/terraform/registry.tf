# Artifact Registry repository for the project images (infra/docker). Tags are immutable, so a
# tag pinned in infra/k8s always means the same bytes and nodes may cache it.
resource "google_artifact_registry_repository" "images" {
  repository_id = var.cluster_name
  location      = var.region
  format        = "DOCKER"
  description   = "Project images: the Ray/DeepSpeed training image and the MLflow server image."

  docker_config {
    immutable_tags = true
  }

  depends_on = [google_project_service.apis]
}
