# Cloud SQL for PostgreSQL: MLflow's backend store (runs, params, metrics) and the basic-auth
# user store. Private IP only (no public IP at all), reached from the MLflow Pod through the
# Cloud SQL Auth Proxy sidecar, which authenticates with IAM (Workload Identity) and encrypts
# with mTLS. MLflow logs in to PostgreSQL as its Google service account (IAM database
# authentication, `--auto-iam-authn` on the proxy): there is no database password anywhere, so
# none can leak from a Pod, a Secret or Terraform state.

# Cloud SQL instance names cannot be reused for about a week after deletion; a suffix lets a
# destroy + apply cycle succeed.
resource "random_id" "db_suffix" {
  byte_length = 3
}

resource "google_sql_database_instance" "mlflow" {
  name                = "${var.cluster_name}-mlflow-${random_id.db_suffix.hex}"
  region              = var.region
  database_version    = var.db_version
  deletion_protection = var.deletion_protection

  settings {
    # PostgreSQL 16+ defaults to the (pricier) ENTERPRISE_PLUS edition; MLflow metadata does
    # not need it.
    edition           = "ENTERPRISE"
    tier              = var.db_tier
    availability_type = var.db_availability_type
    disk_type         = "PD_SSD"
    disk_size         = var.db_disk_size_gb
    disk_autoresize   = true

    deletion_protection_enabled = var.deletion_protection
    user_labels                 = local.labels

    ip_configuration {
      ipv4_enabled    = false
      private_network = google_compute_network.main.id
      # Only clients with a certificate issued by this instance get in; the Auth Proxy obtains
      # one automatically for identities that hold roles/cloudsql.client.
      ssl_mode = "TRUSTED_CLIENT_CERTIFICATE_REQUIRED"
    }

    backup_configuration {
      enabled                        = true
      point_in_time_recovery_enabled = true
      start_time                     = "03:00"
      transaction_log_retention_days = 7

      backup_retention_settings {
        retained_backups = 14
      }
    }

    maintenance_window {
      day          = 7
      hour         = 4
      update_track = "stable"
    }

    # Logging flags recommended by the CIS benchmark for Cloud SQL PostgreSQL. MLflow's query
    # volume is small, so logging every connection and statement duration costs little.
    # IAM database authentication: PostgreSQL users that are Google identities, no passwords.
    database_flags {
      name  = "cloudsql.iam_authentication"
      value = "on"
    }
    database_flags {
      name  = "log_checkpoints"
      value = "on"
    }
    database_flags {
      name  = "log_connections"
      value = "on"
    }
    database_flags {
      name  = "log_disconnections"
      value = "on"
    }
    database_flags {
      name  = "log_lock_waits"
      value = "on"
    }
    database_flags {
      name  = "log_duration"
      value = "on"
    }
    database_flags {
      name  = "log_hostname"
      value = "on"
    }
    database_flags {
      name  = "log_statement"
      value = "ddl"
    }
    database_flags {
      name  = "log_min_messages"
      value = "warning"
    }
    database_flags {
      name  = "log_min_error_statement"
      value = "error"
    }
    database_flags {
      name  = "log_temp_files"
      value = "0"
    }
    database_flags {
      name  = "log_min_duration_statement"
      value = "-1"
    }
    database_flags {
      name  = "cloudsql.enable_pgaudit"
      value = "on"
    }
    database_flags {
      name  = "pgaudit.log"
      value = "ddl,role"
    }
  }

  # The private IP comes from the peered range, which must exist first.
  depends_on = [google_service_networking_connection.private_services]
}

resource "google_sql_database" "mlflow" {
  name     = "mlflow"
  instance = google_sql_database_instance.mlflow.name
}

# MLflow's basic-auth app keeps users and permissions in a database of its own.
resource "google_sql_database" "mlflow_auth" {
  name     = "mlflow_auth"
  instance = google_sql_database_instance.mlflow.name
}

# The MLflow service account as a PostgreSQL user. IAM users start without privileges on the
# databases above: infra/README.md (step 5) grants them once.
resource "google_sql_user" "mlflow" {
  name     = local.mlflow_db_user
  instance = google_sql_database_instance.mlflow.name
  type     = "CLOUD_IAM_SERVICE_ACCOUNT"
}
