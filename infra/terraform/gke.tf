# The GKE Standard cluster: regional control plane, private nodes, Workload Identity, Dataplane V2
# (enforces the NetworkPolicies in infra/k8s). Node pools live in node_pools.tf; the default pool
# is removed so that every node is created with the settings chosen there.

resource "google_container_cluster" "main" {
  name     = var.cluster_name
  location = var.region

  network         = google_compute_network.main.id
  subnetwork      = google_compute_subnetwork.nodes.id
  networking_mode = "VPC_NATIVE"

  ip_allocation_policy {
    cluster_secondary_range_name  = "pods"
    services_secondary_range_name = "services"
  }

  remove_default_node_pool = true
  initial_node_count       = 1
  deletion_protection      = var.deletion_protection

  # GKE always creates a default pool first and only then removes it. These settings make even
  # that short-lived pool use the least-privilege node account and the GKE metadata server
  # instead of the Compute Engine default service account.
  node_config {
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]

    workload_metadata_config {
      mode = "GKE_METADATA"
    }

    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }

  release_channel {
    channel = var.release_channel
  }

  # The GKE version decides the NVIDIA driver that gpu_driver_version = DEFAULT installs; this floor
  # keeps it on a branch that runs the image's CUDA 13 (infra/README.md, "CUDA and driver").
  min_master_version = var.gke_min_version

  # Upgrades and repairs only in the window; exclusions (e.g. NO_MINOR_OR_NODE_UPGRADES for the length
  # of a pretraining run) stop them altogether. Node pools upgrade one GPU node at a time (node_pools.tf).
  maintenance_policy {
    recurring_window {
      start_time = var.maintenance_recurring_window.start_time
      end_time   = var.maintenance_recurring_window.end_time
      recurrence = var.maintenance_recurring_window.recurrence
    }

    dynamic "maintenance_exclusion" {
      for_each = var.maintenance_exclusions
      content {
        exclusion_name = maintenance_exclusion.value.name
        start_time     = maintenance_exclusion.value.start_time
        end_time       = maintenance_exclusion.value.end_time
        exclusion_options {
          scope = maintenance_exclusion.value.scope
        }
      }
    }
  }

  # Private nodes: no node has an external IP; egress goes through Cloud NAT (network.tf).
  # The control plane keeps its public endpoint but only the authorized networks may reach it.
  private_cluster_config {
    enable_private_nodes    = true
    enable_private_endpoint = false
    master_ipv4_cidr_block  = var.master_ipv4_cidr_block
  }

  master_authorized_networks_config {
    gcp_public_cidrs_access_enabled = false

    dynamic "cidr_blocks" {
      for_each = var.master_authorized_networks
      content {
        cidr_block   = cidr_blocks.value.cidr_block
        display_name = cidr_blocks.value.display_name
      }
    }
  }

  # Workload Identity: Pods authenticate to Google APIs as a Google service account bound to
  # their Kubernetes service account (iam.tf). No JSON key is ever created or mounted.
  workload_identity_config {
    workload_pool = local.workload_pool
  }

  # Dataplane V2 (eBPF) enforces NetworkPolicy natively; the legacy Calico add-on stays off.
  datapath_provider = "ADVANCED_DATAPATH"
  network_policy {
    enabled = false
  }

  # Traffic between Pods on the same node goes through the VPC too, so flow logs see it.
  enable_intranode_visibility = true

  enable_shielded_nodes = true
  enable_legacy_abac    = false

  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }

  # Enforces the project's Binary Authorization policy (binauthz.tf): only images from this stack's
  # registry and a few pinned third-party images may run.
  binary_authorization {
    evaluation_mode = "PROJECT_SINGLETON_POLICY_ENFORCE"
  }

  dynamic "authenticator_groups_config" {
    for_each = var.rbac_security_group == null ? [] : [var.rbac_security_group]
    content {
      security_group = authenticator_groups_config.value
    }
  }

  addons_config {
    # Nothing in this design is exposed through a load balancer (see infra/k8s), so the
    # Ingress controller is not needed.
    http_load_balancing {
      disabled = true
    }
  }

  logging_config {
    enable_components = ["SYSTEM_COMPONENTS", "WORKLOADS"]
  }

  # DCGM: GKE runs NVIDIA's DCGM exporter on GPU nodes and sends GPU utilisation, memory, temperature
  # and XID errors to Managed Prometheus (alerts in monitoring.tf). Ray's own metrics are scraped by the
  # PodMonitoring in infra/k8s/monitoring.yaml.
  monitoring_config {
    enable_components = ["SYSTEM_COMPONENTS", "DCGM"]
    managed_prometheus {
      enabled = true
    }
  }

  # Node auto-provisioning stays off (enabled = false): the two pools in node_pools.tf are the only
  # machines the cluster may create, so nothing but their own limits can add GPU spend. Their own
  # autoscalers scale idle nodes down sooner with this profile: idle H100 nodes are the main cost.
  cluster_autoscaling {
    enabled             = false
    autoscaling_profile = "OPTIMIZE_UTILIZATION"
  }

  # Per-namespace cost breakdown in the billing export.
  cost_management_config {
    enabled = true
  }

  resource_labels = local.labels

  # The default pool's node_config above only matters at creation; the API reports it
  # differently afterwards, which would otherwise show up as a diff on every plan.
  lifecycle {
    ignore_changes = [node_config]
  }

  depends_on = [google_project_service.apis]
}
