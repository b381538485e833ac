# Binary Authorization: the cluster (gke.tf, PROJECT_SINGLETON_POLICY_ENFORCE) admits only images from
# this stack's Artifact Registry repository, the few third-party images pinned in infra/k8s
# (local.external_images, exact tags), and Google's own GKE system images. Anything else (an image
# swapped into a Pod spec, a `kubectl run` of a public image) is refused and logged.
#
# This is the project's one policy: applying it replaces whatever policy the project had.
resource "google_binary_authorization_policy" "images" {
  project                       = var.project_id
  description                   = "Only ${var.cluster_name}'s registry and pinned third-party images."
  global_policy_evaluation_mode = "ENABLE"

  admission_whitelist_patterns {
    name_pattern = "${local.image_registry}/**"
  }

  dynamic "admission_whitelist_patterns" {
    for_each = local.external_images
    content {
      name_pattern = admission_whitelist_patterns.value
    }
  }

  default_admission_rule {
    evaluation_mode  = "ALWAYS_DENY"
    enforcement_mode = "ENFORCED_BLOCK_AND_AUDIT_LOG"
  }

  depends_on = [google_project_service.apis]
}
