# Network: a dedicated VPC (never the project's default network), one regional subnet for the
# nodes with secondary ranges for Pods and Services (VPC-native GKE), Cloud NAT so private nodes
# can reach PyPI / Docker Hub, and firewall rules.

resource "google_compute_network" "main" {
  name                    = "${var.cluster_name}-vpc"
  auto_create_subnetworks = false
  routing_mode            = "REGIONAL"

  depends_on = [google_project_service.apis]
}

resource "google_compute_subnetwork" "nodes" {
  name          = "${var.cluster_name}-nodes"
  region        = var.region
  network       = google_compute_network.main.id
  ip_cidr_range = var.subnet_cidr

  # Nodes have no public IP; this lets them reach GCS, Artifact Registry and the other Google APIs
  # over Google's network instead of through NAT (shard reads never pay NAT processing).
  private_ip_google_access = true

  secondary_ip_range {
    range_name    = "pods"
    ip_cidr_range = var.pods_cidr
  }

  secondary_ip_range {
    range_name    = "services"
    ip_cidr_range = var.services_cidr
  }

  # Flow logs help debug connectivity (e.g. NCCL between GPU nodes). Sampled to keep cost down.
  log_config {
    aggregation_interval = "INTERVAL_5_MIN"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

# Cloud NAT: outbound-only internet for private nodes (pip installs in runtime_env, image pulls
# from Docker Hub). Nothing on the internet can open a connection to the nodes through it.
resource "google_compute_router" "nat" {
  name    = "${var.cluster_name}-router"
  region  = var.region
  network = google_compute_network.main.id
}

resource "google_compute_router_nat" "nat" {
  name                               = "${var.cluster_name}-nat"
  router                             = google_compute_router.nat.name
  region                             = var.region
  nat_ip_allocate_option             = "AUTO_ONLY"
  source_subnetwork_ip_ranges_to_nat = "LIST_OF_SUBNETWORKS"

  subnetwork {
    name                    = google_compute_subnetwork.nodes.id
    source_ip_ranges_to_nat = ["ALL_IP_RANGES"]
  }

  # Large image pulls open many parallel connections; dynamic allocation gives busy nodes more
  # ports instead of failing with "out of NAT ports".
  enable_dynamic_port_allocation      = true
  enable_endpoint_independent_mapping = false
  min_ports_per_vm                    = 1024
  max_ports_per_vm                    = 65536

  log_config {
    enable = true
    filter = "ERRORS_ONLY"
  }
}

# Ray uses many ports between Pods (GCS 6379, dashboard 8265, object manager, worker ports
# 10002-19999) and NCCL opens its own. Allow all traffic that starts inside the cluster's own
# ranges; nothing from outside. (GKE adds similar rules itself; this one is explicit and logged.)
resource "google_compute_firewall" "allow_internal" {
  name      = "${var.cluster_name}-allow-internal"
  network   = google_compute_network.main.id
  direction = "INGRESS"
  priority  = 1000

  source_ranges = [var.subnet_cidr, var.pods_cidr]

  allow {
    protocol = "tcp"
  }
  allow {
    protocol = "udp"
  }
  allow {
    protocol = "icmp"
  }

  log_config {
    metadata = "EXCLUDE_ALL_METADATA"
  }
}

# Explicit, logged deny for everything else that comes in. GCP already denies unmatched ingress
# implicitly; this rule makes the intent visible and records the attempts.
resource "google_compute_firewall" "deny_all_ingress" {
  name      = "${var.cluster_name}-deny-all-ingress"
  network   = google_compute_network.main.id
  direction = "INGRESS"
  priority  = 65534

  source_ranges = ["0.0.0.0/0"]

  deny {
    protocol = "all"
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# Private services access: a range of this VPC peered with Google's service producer network,
# so Cloud SQL gets a private IP reachable from the cluster and no public IP at all.
resource "google_compute_global_address" "private_services" {
  name          = "${var.cluster_name}-private-services"
  purpose       = "VPC_PEERING"
  address_type  = "INTERNAL"
  prefix_length = 20
  network       = google_compute_network.main.id
}

resource "google_service_networking_connection" "private_services" {
  network                 = google_compute_network.main.id
  service                 = "servicenetworking.googleapis.com"
  reserved_peering_ranges = [google_compute_global_address.private_services.name]

  # Removing the peering while Cloud SQL / Memorystore still use it fails, and on destroy the
  # producers remove it with their instances anyway: Terraform only forgets it.
  deletion_policy = "ABANDON"
}

# Google APIs through the private.googleapis.com addresses (199.36.153.8/30), reached over Private
# Google Access. With this zone every *.googleapis.com name resolves to those four addresses, so the
# egress NetworkPolicies (infra/k8s) can allow Google APIs (GCS, Cloud SQL Admin, Monitoring) by IP
# while denying the rest of the internet to Pods.
resource "google_dns_managed_zone" "googleapis" {
  name        = "${var.cluster_name}-googleapis"
  dns_name    = "googleapis.com."
  description = "Google APIs over private.googleapis.com for the ${var.cluster_name} VPC."
  visibility  = "private"

  private_visibility_config {
    networks {
      network_url = google_compute_network.main.id
    }
  }

  depends_on = [google_project_service.apis]
}

resource "google_dns_record_set" "googleapis_private" {
  managed_zone = google_dns_managed_zone.googleapis.name
  name         = "private.googleapis.com."
  type         = "A"
  ttl          = 300
  rrdatas      = local.private_googleapis_ips
}

resource "google_dns_record_set" "googleapis_wildcard" {
  managed_zone = google_dns_managed_zone.googleapis.name
  name         = "*.googleapis.com."
  type         = "CNAME"
  ttl          = 300
  rrdatas      = ["private.googleapis.com."]
}
