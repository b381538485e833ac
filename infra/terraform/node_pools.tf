# Node pools. Both run COS with containerd, shielded VMs with secure boot, the GKE metadata server
# (required by Workload Identity) and a dedicated least-privilege node service account (iam.tf),
# never the Compute Engine default service account.

# CPU pool: Ray head Pods, the MLflow server, the KubeRay operator and GKE system Pods.
resource "google_container_node_pool" "cpu" {
  name     = "cpu"
  cluster  = google_container_cluster.main.id
  location = var.region

  # total_* counts are for the whole pool across zones (min/max_node_count would be per zone).
  autoscaling {
    total_min_node_count = var.cpu_min_nodes
    total_max_node_count = var.cpu_max_nodes
    location_policy      = "BALANCED"
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  upgrade_settings {
    strategy        = "SURGE"
    max_surge       = 1
    max_unavailable = 0
  }

  node_config {
    machine_type = var.cpu_machine_type
    image_type   = "COS_CONTAINERD"
    disk_type    = "pd-balanced"
    disk_size_gb = 100

    service_account = google_service_account.nodes.email
    # The broad scope is what Google recommends with a dedicated service account: IAM roles on that
    # account (not scopes) decide what the node can do.
    oauth_scopes = ["https://www.googleapis.com/auth/cloud-platform"]

    workload_metadata_config {
      mode = "GKE_METADATA"
    }

    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }

    metadata = {
      disable-legacy-endpoints = "true"
    }

    # Image streaming: containers start while their layers are still being fetched.
    gcfs_config {
      enabled = true
    }

    labels = {
      "vitpipe/pool" = "cpu"
    }

    resource_labels = local.labels
  }
}

# GPU pool: Ray GPU workers, one Pod per node using all of its GPUs. Scales to zero when idle.
# How nodes are obtained is var.gpu_provisioning (infra/README.md, "Getting H100s").
resource "google_container_node_pool" "gpu" {
  #checkov:skip=CKV_GCP_9:Auto-repair is on except for Dynamic Workload Scheduler capacity (flex-start, queued provisioning), which GKE requires without it; checkov cannot evaluate the expression.
  name           = "gpu"
  cluster        = google_container_cluster.main.id
  location       = var.region
  node_locations = var.gpu_node_locations

  # Start empty; the cluster autoscaler adds nodes when Ray worker Pods are pending and removes
  # them again when they have been idle (cluster_autoscaling profile in gke.tf).
  initial_node_count = 0

  autoscaling {
    total_min_node_count = var.gpu_min_nodes
    total_max_node_count = var.gpu_max_nodes
    # Take capacity in whichever listed zone has it: H100s are often scarce.
    location_policy = "ANY"
  }

  # Dynamic Workload Scheduler nodes are not repaired in place (GKE replaces them through a new
  # request); every other mode keeps auto-repair.
  management {
    auto_repair  = !local.gpu_dws
    auto_upgrade = true
  }

  # One node at a time, without a spare: a surge node would be one more H100 machine, which is
  # often not available (and costs ~US$88/h). Training loses that worker and resumes from its checkpoint;
  # maintenance exclusions (gke.tf) keep upgrades out of long runs altogether.
  upgrade_settings {
    strategy        = "SURGE"
    max_surge       = 0
    max_unavailable = 1
  }

  # DWS queued provisioning: Kueue's ProvisioningRequest admission check asks for all nodes of a job
  # at once, and GKE creates them together when capacity exists (infra/k8s/kueue/provisioning.yaml).
  dynamic "queued_provisioning" {
    for_each = var.gpu_provisioning == "QUEUED_PROVISIONING" ? [1] : []
    content {
      enabled = true
    }
  }

  # Compact placement: nodes close together in one zone, for lower NCCL latency between them.
  dynamic "placement_policy" {
    for_each = var.gpu_compact_placement ? [1] : []
    content {
      type = "COMPACT"
    }
  }

  lifecycle {
    precondition {
      condition     = var.gpu_provisioning != "RESERVATION" || var.gpu_reservation_name != null
      error_message = "gpu_provisioning = RESERVATION needs gpu_reservation_name (the reservation of gpu_machine_type in the GPU zone)."
    }
    precondition {
      condition     = !var.gpu_compact_placement || length(var.gpu_node_locations) == 1
      error_message = "gpu_compact_placement needs exactly one zone in gpu_node_locations."
    }
  }

  node_config {
    machine_type = var.gpu_machine_type
    image_type   = "COS_CONTAINERD"
    disk_type    = "pd-ssd"
    disk_size_gb = var.gpu_disk_size_gb
    spot         = var.gpu_provisioning == "SPOT"
    flex_start   = var.gpu_provisioning == "FLEX_START"

    # RESERVATION consumes the named reservation only; ON_DEMAND takes a matching open reservation
    # when one exists; Spot and DWS capacity cannot come from a reservation.
    reservation_affinity {
      consume_reservation_type = local.gpu_reservation_type
      key                      = var.gpu_provisioning == "RESERVATION" ? "compute.googleapis.com/reservation-name" : null
      values                   = var.gpu_provisioning == "RESERVATION" ? [var.gpu_reservation_name] : null
    }

    guest_accelerator {
      type  = var.gpu_accelerator_type
      count = var.gpu_accelerator_count

      # GKE installs the NVIDIA driver itself (no driver DaemonSet to maintain): DEFAULT is the
      # branch GKE pairs with the cluster version, kept on R580+ (CUDA 13) by gke_min_version.
      gpu_driver_installation_config {
        gpu_driver_version = var.gpu_driver_version
      }
    }

    # Only Pods that tolerate this taint (the Ray GPU workers) land on GPU nodes, so a stray CPU
    # Pod can never keep an H100 node alive.
    taint {
      key    = "nvidia.com/gpu"
      value  = "present"
      effect = "NO_SCHEDULE"
    }

    # A3 machines require gVNIC.
    gvnic {
      enabled = true
    }

    dynamic "ephemeral_storage_local_ssd_config" {
      for_each = var.gpu_local_ssd_count > 0 ? [var.gpu_local_ssd_count] : []
      content {
        local_ssd_count = ephemeral_storage_local_ssd_config.value
      }
    }

    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]

    workload_metadata_config {
      mode = "GKE_METADATA"
    }

    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }

    metadata = {
      disable-legacy-endpoints = "true"
    }

    # Image streaming: the ~15 GB project image starts in seconds instead of minutes per new node.
    gcfs_config {
      enabled = true
    }

    labels = {
      "vitpipe/pool" = "gpu"
    }

    resource_labels = local.labels
  }
}
