# Memorystore for Redis: external storage for the Ray head's GCS (Ray GCS fault tolerance). With it a
# crashed or evicted head comes back with the cluster's state (nodes, actors, placement groups, the
# job table) and the GPU workers stay up instead of being restarted with it. Private IP only (through
# the same private services access peering as Cloud SQL), AUTH on, TLS in transit.
resource "google_redis_instance" "ray_gcs" {
  name           = "${var.cluster_name}-ray-gcs"
  region         = var.region
  tier           = var.redis_tier
  memory_size_gb = var.redis_memory_gb
  redis_version  = "REDIS_7_2"

  authorized_network      = google_compute_network.main.id
  connect_mode            = "PRIVATE_SERVICE_ACCESS"
  auth_enabled            = true
  transit_encryption_mode = "SERVER_AUTHENTICATION"

  labels = local.labels

  depends_on = [google_service_networking_connection.private_services]
}
