# Alerts and the budget. GPU metrics come from GKE's managed DCGM exporter (gke.tf), Ray's from the
# PodMonitoring in infra/k8s/monitoring.yaml; both land in Managed Service for Prometheus and are
# queried here with PromQL.

data "google_project" "this" {
  project_id = var.project_id
}

resource "google_monitoring_notification_channel" "email" {
  count        = var.alert_email == null ? 0 : 1
  display_name = "${var.cluster_name} operators"
  type         = "email"
  labels = {
    email_address = var.alert_email
  }
}

locals {
  notification_channels = google_monitoring_notification_channel.email[*].id
}

# The costly failure: H100 nodes that exist but do nothing (a forgotten RayCluster, a job stuck
# waiting for data). One a3-highgpu-8g node idles at ~US$88/h.
resource "google_monitoring_alert_policy" "gpus_idle" {
  display_name          = "${var.cluster_name}: GPU node idle for 30 minutes"
  combiner              = "OR"
  notification_channels = local.notification_channels

  conditions {
    display_name = "average GPU utilisation of a node below 5 % for 30 minutes"
    condition_prometheus_query_language {
      query    = "avg by (node) (avg_over_time(DCGM_FI_DEV_GPU_UTIL{cluster=\"${var.cluster_name}\"}[30m])) < 5"
      duration = "0s"
    }
  }

  documentation {
    content   = "GPU nodes of ${var.cluster_name} are up but idle. `kubectl get rayclusters,rayjobs -A` and delete what is no longer used (infra/README.md, 'What it costs')."
    mime_type = "text/markdown"
  }
}

# Hardware trouble that kills long runs: XID errors (ECC, fallen-off-the-bus, NVLink faults).
resource "google_monitoring_alert_policy" "gpu_xid_errors" {
  display_name          = "${var.cluster_name}: GPU XID errors"
  combiner              = "OR"
  notification_channels = local.notification_channels

  conditions {
    display_name = "a GPU reported an XID error"
    condition_prometheus_query_language {
      query    = "max by (node, gpu) (DCGM_FI_DEV_XID_ERRORS{cluster=\"${var.cluster_name}\"}) > 0"
      duration = "60s"
    }
  }

  documentation {
    content   = "A GPU of ${var.cluster_name} reported an NVIDIA XID error. Cordon the node (`kubectl cordon`); training resumes on a new node from its latest checkpoint."
    mime_type = "text/markdown"
  }
}

# A Ray head that Prometheus cannot scrape for 10 minutes is down or wedged.
resource "google_monitoring_alert_policy" "ray_head_down" {
  display_name          = "${var.cluster_name}: Ray head not answering"
  combiner              = "OR"
  notification_channels = local.notification_channels

  conditions {
    display_name = "Ray head metrics target down for 10 minutes"
    condition_prometheus_query_language {
      query    = "max by (pod) (up{cluster=\"${var.cluster_name}\", namespace=\"${var.k8s_namespace}\", job=\"ray-nodes\", pod=~\".*-head-.*\"}) == 0"
      duration = "600s"
    }
  }

  documentation {
    content   = "The Ray head Pod of a cluster in ${var.k8s_namespace} stopped exporting metrics. `kubectl -n ${var.k8s_namespace} get pods -l ray.io/node-type=head`; with GCS fault tolerance the head restarts with its state."
    mime_type = "text/markdown"
  }
}

# Monthly budget on this project: notices at 50/90/100 % of actual spend and at 100 % of forecast.
resource "google_billing_budget" "project" {
  count           = var.billing_account_id == null ? 0 : 1
  billing_account = var.billing_account_id
  display_name    = "${var.cluster_name} monthly budget"

  budget_filter {
    projects = ["projects/${data.google_project.this.number}"]
  }

  amount {
    specified_amount {
      currency_code = "USD"
      units         = tostring(var.monthly_budget_usd)
    }
  }

  threshold_rules {
    threshold_percent = 0.5
  }
  threshold_rules {
    threshold_percent = 0.9
  }
  threshold_rules {
    threshold_percent = 1.0
  }
  threshold_rules {
    threshold_percent = 1.0
    spend_basis       = "FORECASTED_SPEND"
  }

  all_updates_rule {
    monitoring_notification_channels = local.notification_channels
    disable_default_iam_recipients   = false
  }
}
