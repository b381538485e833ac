# Copy to terraform.tfvars (git-ignored) or pass with -var-file, and edit.
#   terraform -chdir=infra/terraform apply -var-file=example.tfvars

project_id = "my-vit-project"
region     = "us-central1"

# Your workstation's public IP (curl -s https://checkip.amazonaws.com) or your VPN's range.
master_authorized_networks = [
  { cidr_block = "203.0.113.10/32", display_name = "my-workstation" },
]

# Default GPU pool: H100 8-GPU nodes, scaled to zero when idle.
gpu_machine_type      = "a3-highgpu-8g"
gpu_accelerator_type  = "nvidia-h100-80gb"
gpu_accelerator_count = 8
gpu_node_locations    = ["us-central1-a"]
gpu_min_nodes         = 0
gpu_max_nodes         = 2
# How GPU nodes are obtained (infra/README.md, "Getting H100s"): ON_DEMAND, SPOT, RESERVATION
# (with gpu_reservation_name), FLEX_START or QUEUED_PROVISIONING.
gpu_provisioning = "ON_DEMAND"
# gpu_reservation_name  = "my-h100-reservation"
# gpu_compact_placement = true

# Alerts (idle GPUs, XID errors, Ray head down) and a monthly budget notice.
# alert_email        = "ml-oncall@example.com"
# billing_account_id = "000000-000000-000000"
# monthly_budget_usd = 5000

# Keep upgrades out of a long pretraining run (scope NO_MINOR_OR_NODE_UPGRADES may span weeks):
# maintenance_exclusions = [
#   { name = "vit-h14-run", start_time = "2026-12-01T00:00:00Z", end_time = "2026-12-29T00:00:00Z", scope = "NO_MINOR_OR_NODE_UPGRADES" },
# ]

# Smaller and cheaper, for a first end-to-end try (one L4 GPU per node):
# gpu_machine_type      = "g2-standard-8"
# gpu_accelerator_type  = "nvidia-l4"
# gpu_accelerator_count = 1
# gpu_local_ssd_count   = 0
# (then also lower the GPU requests of the Ray workers in infra/k8s/ray/*.yaml)

labels = {
  team = "vision"
}
