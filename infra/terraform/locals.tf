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

  # Bucket names are global across all of GCS, so they are prefixed with the project id.
  bucket_prefix = "${var.project_id}-${var.cluster_name}"

  # The Workload Identity pool of this project: Kubernetes service accounts appear in IAM as
  # serviceAccount:<project>.svc.id.goog[<namespace>/<ksa>].
  workload_pool = "${var.project_id}.svc.id.goog"

  ray_ksa_member    = "serviceAccount:${local.workload_pool}[${var.k8s_namespace}/${var.ray_ksa_name}]"
  mlflow_ksa_member = "serviceAccount:${local.workload_pool}[${var.k8s_namespace}/${var.mlflow_ksa_name}]"

  # Where `docker push` sends the project's images.
  image_registry = "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}"
}
