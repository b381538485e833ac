# Inputs. Every variable has a type and a description; defaults are the ViT-H/14 pretraining setup
# (H100 8-GPU nodes) described in infra/README.md. Required inputs (no default): project_id and
# master_authorized_networks. See example.tfvars.

# --- Project and location ---------------------------------------------------------------------

variable "project_id" {
  type        = string
  description = "Google Cloud project id that receives every resource (must already exist, with billing enabled)."

  validation {
    # Google's own rule for project ids; the length bound also keeps every bucket name <= 63 characters.
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be 6-30 characters of lowercase letters, digits and '-', starting with a letter."
  }
}

variable "region" {
  type        = string
  description = "Region of the cluster control plane, the subnet, Cloud SQL and the buckets. Pick one that has the GPU type in gpu_node_locations."
  default     = "us-central1"
}

variable "cluster_name" {
  type        = string
  description = "Name of the GKE cluster; also the prefix of the other resource names (service accounts, buckets, database)."
  default     = "vitpipe"

  validation {
    # Service account ids are limited to 30 characters and get suffixes like "-mlflow".
    condition     = can(regex("^[a-z][a-z0-9-]{2,18}$", var.cluster_name))
    error_message = "cluster_name must be 3-19 characters of lowercase letters, digits and '-', starting with a letter."
  }
}

variable "labels" {
  type        = map(string)
  description = "Extra labels added to every resource that supports labels (for billing breakdowns)."
  default     = {}
}

variable "deletion_protection" {
  type        = bool
  description = "Protect the GKE cluster and the Cloud SQL instance against `terraform destroy`. Set to false, apply, then destroy, when tearing down on purpose."
  default     = true
}

# --- Network ----------------------------------------------------------------------------------

variable "subnet_cidr" {
  type        = string
  description = "Primary IPv4 range of the node subnet."
  default     = "10.0.0.0/20"
}

variable "pods_cidr" {
  type        = string
  description = "Secondary range of the subnet used for Pod IPs (VPC-native cluster). A /14 fits about 1000 nodes at 110 Pods each."
  default     = "10.16.0.0/14"
}

variable "services_cidr" {
  type        = string
  description = "Secondary range of the subnet used for Service ClusterIPs."
  default     = "10.20.0.0/20"
}

variable "master_ipv4_cidr_block" {
  type        = string
  description = "/28 range for the private endpoint of the GKE control plane; must not overlap the ranges above."
  default     = "172.16.0.0/28"
}

variable "master_authorized_networks" {
  type = list(object({
    cidr_block   = string
    display_name = string
  }))
  description = "Networks (your workstation or VPN egress, as /32 or small CIDRs) allowed to reach the Kubernetes API. The nodes themselves are never public."

  validation {
    condition     = length(var.master_authorized_networks) > 0 && alltrue([for n in var.master_authorized_networks : !endswith(n.cidr_block, "/0")])
    error_message = "Give at least one authorized network, and never 0.0.0.0/0: the control plane would be open to the whole internet."
  }
}

# --- GKE --------------------------------------------------------------------------------------

variable "release_channel" {
  type        = string
  description = "GKE release channel: the control plane and nodes follow it with automatic upgrades."
  default     = "REGULAR"

  validation {
    condition     = contains(["RAPID", "REGULAR", "STABLE"], var.release_channel)
    error_message = "release_channel must be RAPID, REGULAR or STABLE."
  }
}

variable "gke_min_version" {
  type        = string
  description = "Oldest GKE minor version the control plane may run (min_master_version). It decides which NVIDIA driver gpu_driver_version=DEFAULT installs: 1.34 is the first minor assumed to default to driver branch R580, the one CUDA 13 (torch 2.14.1) needs. See infra/README.md, 'CUDA and driver'."
  default     = "1.34"

  validation {
    condition     = can(regex("^1\\.[0-9]+$", var.gke_min_version)) && try(tonumber(split(".", var.gke_min_version)[1]) >= 34, false)
    error_message = "gke_min_version must be a minor version 1.34 or later (e.g. \"1.35\"): older GKE versions default to drivers older than R580, which cannot run CUDA 13."
  }
}

variable "maintenance_recurring_window" {
  type = object({
    start_time = string
    end_time   = string
    recurrence = string
  })
  description = "When GKE may upgrade or repair the control plane and nodes (RFC 3339 times, RRULE recurrence). Default: Saturday and Sunday 01:00-09:00 UTC."
  default = {
    start_time = "2026-01-03T01:00:00Z"
    end_time   = "2026-01-03T09:00:00Z"
    recurrence = "FREQ=WEEKLY;BYDAY=SA,SU"
  }
}

variable "maintenance_exclusions" {
  type = list(object({
    name       = string
    start_time = string
    end_time   = string
    scope      = string
  }))
  description = "Periods in which GKE must not upgrade (a long pretraining run): RFC 3339 times, scope NO_UPGRADES (at most 30 days), NO_MINOR_UPGRADES or NO_MINOR_OR_NODE_UPGRADES (up to the version's end of support)."
  default     = []

  validation {
    condition     = alltrue([for e in var.maintenance_exclusions : contains(["NO_UPGRADES", "NO_MINOR_UPGRADES", "NO_MINOR_OR_NODE_UPGRADES"], e.scope)])
    error_message = "Each maintenance_exclusions[].scope must be NO_UPGRADES, NO_MINOR_UPGRADES or NO_MINOR_OR_NODE_UPGRADES."
  }
}

variable "rbac_security_group" {
  type        = string
  description = "Optional Google Group (gke-security-groups@<your-domain>) for Kubernetes RBAC with Google Groups. Needs Cloud Identity / Workspace; null leaves the feature off."
  default     = null
}

variable "k8s_namespace" {
  type        = string
  description = "Kubernetes namespace of the Ray clusters and jobs (must match infra/k8s)."
  default     = "vitpipe"
}

variable "mlflow_namespace" {
  type        = string
  description = "Kubernetes namespace of the MLflow server, apart from the Ray namespace so job code cannot touch it (must match infra/k8s)."
  default     = "mlflow"
}

variable "ray_ksa_name" {
  type        = string
  description = "Kubernetes service account of the Ray head, workers and job submitters (must match infra/k8s)."
  default     = "ray"
}

variable "mlflow_ksa_name" {
  type        = string
  description = "Kubernetes service account of the MLflow tracking server (must match infra/k8s)."
  default     = "mlflow"
}

# --- CPU node pool (Ray head, MLflow, KubeRay operator) ---------------------------------------

variable "cpu_machine_type" {
  type        = string
  description = "Machine type of the CPU pool that runs the Ray head, the MLflow server and the KubeRay operator."
  default     = "n2-standard-16"
}

variable "cpu_min_nodes" {
  type        = number
  description = "Minimum number of CPU nodes in the whole pool (all zones together). 1 keeps MLflow and the operator up."
  default     = 1
}

variable "cpu_max_nodes" {
  type        = number
  description = "Maximum number of CPU nodes in the whole pool (all zones together)."
  default     = 4
}

# --- GPU node pool (Ray GPU workers) ----------------------------------------------------------

variable "gpu_machine_type" {
  type        = string
  description = "Machine type of the GPU pool. a3-highgpu-8g = 8x H100 80GB, 208 vCPU, 1872 GB RAM."
  default     = "a3-highgpu-8g"
}

variable "gpu_accelerator_type" {
  type        = string
  description = "GPU type attached to each GPU node (must match gpu_machine_type for A3/A2 machines)."
  default     = "nvidia-h100-80gb"
}

variable "gpu_accelerator_count" {
  type        = number
  description = "GPUs per GPU node. The Ray worker Pods in infra/k8s request this many GPUs each (one Pod per node)."
  default     = 8

  validation {
    condition     = contains([1, 2, 4, 8, 16], var.gpu_accelerator_count)
    error_message = "gpu_accelerator_count must be 1, 2, 4, 8 or 16."
  }
}

variable "gpu_node_locations" {
  type        = list(string)
  description = "Zones of the GPU pool. H100 capacity is zonal: list zones of var.region that offer gpu_accelerator_type (`gcloud compute accelerator-types list`)."
  default     = ["us-central1-a"]
}

variable "gpu_min_nodes" {
  type        = number
  description = "Minimum number of GPU nodes. 0 lets the cluster autoscaler remove every GPU node when no Ray worker needs one."
  default     = 0

  validation {
    condition     = var.gpu_min_nodes >= 0
    error_message = "gpu_min_nodes cannot be negative."
  }
}

variable "gpu_max_nodes" {
  type        = number
  description = "Maximum number of GPU nodes (all GPU zones together); caps spend. Must be >= the worker replicas of the RayJobs in infra/k8s."
  default     = 2
}

variable "gpu_driver_version" {
  type        = string
  description = "NVIDIA driver GKE installs on GPU nodes: DEFAULT (the driver branch GKE pairs with the cluster version, pinned through gke_min_version), or INSTALLATION_DISABLED to install a driver yourself. LATEST is refused: it moves to a new branch whenever GKE publishes one, under a running pool."
  default     = "DEFAULT"

  validation {
    condition     = contains(["DEFAULT", "INSTALLATION_DISABLED"], var.gpu_driver_version)
    error_message = "gpu_driver_version must be DEFAULT or INSTALLATION_DISABLED (LATEST changes the driver under the image's CUDA 13 build; pin it with gke_min_version instead)."
  }
}

variable "gpu_provisioning" {
  type        = string
  description = "How GPU nodes are obtained (infra/README.md, 'Getting H100s'): ON_DEMAND (also uses a matching open reservation), SPOT (cheap, reclaimable), RESERVATION (gpu_reservation_name), FLEX_START (Dynamic Workload Scheduler: waits for capacity, up to 7 days per node) or QUEUED_PROVISIONING (DWS with Kueue ProvisioningRequests: all nodes of a job at once)."
  default     = "ON_DEMAND"

  validation {
    condition     = contains(["ON_DEMAND", "SPOT", "RESERVATION", "FLEX_START", "QUEUED_PROVISIONING"], var.gpu_provisioning)
    error_message = "gpu_provisioning must be ON_DEMAND, SPOT, RESERVATION, FLEX_START or QUEUED_PROVISIONING."
  }
}

variable "gpu_reservation_name" {
  type        = string
  description = "Name of a Compute Engine reservation of gpu_machine_type in the GPU zone, consumed when gpu_provisioning = RESERVATION. A reservation is billed whether or not nodes use it."
  default     = null
}

variable "gpu_compact_placement" {
  type        = bool
  description = "Place GPU nodes physically close (compact placement policy) for lower inter-node latency in multi-node training. Needs exactly one zone in gpu_node_locations."
  default     = false
}

variable "gpu_local_ssd_count" {
  type        = number
  description = "Local NVMe SSDs used as node ephemeral storage (Ray spill, image layers, /tmp). a3-highgpu-8g comes with 16; 0 for machine types without local SSD."
  default     = 16
}

variable "gpu_disk_size_gb" {
  type        = number
  description = "Boot disk size of each GPU node in GB (holds the ~15 GB project image)."
  default     = 200
}

# --- Ray head fault tolerance (Memorystore for Redis) -----------------------------------------

variable "redis_tier" {
  type        = string
  description = "Memorystore tier of the Redis that keeps Ray's GCS state across head restarts: BASIC (one node) or STANDARD_HA (replicated)."
  default     = "BASIC"

  validation {
    condition     = contains(["BASIC", "STANDARD_HA"], var.redis_tier)
    error_message = "redis_tier must be BASIC or STANDARD_HA."
  }
}

variable "redis_memory_gb" {
  type        = number
  description = "Memorystore capacity in GB; Ray's GCS state is small (1 GB holds thousands of actors and jobs)."
  default     = 1
}

# --- Alerts and budget --------------------------------------------------------------------------

variable "alert_email" {
  type        = string
  description = "E-mail address that receives the alerts (idle GPUs, GPU hardware errors, Ray head down) and the budget notices. null: alerts still fire in Cloud Monitoring but notify no one."
  default     = null
}

variable "billing_account_id" {
  type        = string
  description = "Billing account (XXXXXX-XXXXXX-XXXXXX) for the monthly budget alert on this project; null creates no budget. Needs roles/billing.costsManager on the account."
  default     = null
}

variable "monthly_budget_usd" {
  type        = number
  description = "Monthly budget in US dollars; notices at 50 %, 90 % and 100 % of actual spend and at 100 % of forecast spend."
  default     = 5000
}

# --- Storage ----------------------------------------------------------------------------------

variable "force_destroy_buckets" {
  type        = bool
  description = "Allow `terraform destroy` to delete buckets that still contain objects. Leave false unless you really want the data gone."
  default     = false
}

variable "shards_noncurrent_days" {
  type        = number
  description = "Days an overwritten or deleted shard version is kept before it is removed for good."
  default     = 7
}

variable "checkpoint_noncurrent_days" {
  type        = number
  description = "Days an overwritten or deleted checkpoint version is kept before it is removed for good."
  default     = 14
}

variable "checkpoint_nearline_after_days" {
  type        = number
  description = "Age in days after which checkpoint objects move to the cheaper NEARLINE class (old runs are rarely read)."
  default     = 60
}

variable "access_log_retention_days" {
  type        = number
  description = "Days the bucket access logs are kept."
  default     = 365
}

# --- Cloud SQL (MLflow backend store) ---------------------------------------------------------

variable "db_version" {
  type        = string
  description = "Cloud SQL PostgreSQL major version of the MLflow backend store."
  default     = "POSTGRES_18"

  validation {
    condition     = startswith(var.db_version, "POSTGRES_")
    error_message = "MLflow's backend store here is PostgreSQL: db_version must start with POSTGRES_."
  }
}

variable "db_tier" {
  type        = string
  description = "Cloud SQL machine tier (ENTERPRISE edition). 2 vCPU / 7.5 GB is plenty for MLflow metadata."
  default     = "db-custom-2-7680"
}

variable "db_availability_type" {
  type        = string
  description = "ZONAL (cheaper) or REGIONAL (automatic failover) Cloud SQL instance."
  default     = "ZONAL"

  validation {
    condition     = contains(["ZONAL", "REGIONAL"], var.db_availability_type)
    error_message = "db_availability_type must be ZONAL or REGIONAL."
  }
}

variable "db_disk_size_gb" {
  type        = number
  description = "Initial Cloud SQL disk size in GB (it grows automatically)."
  default     = 20
}
