# Cloud SQL for PostgreSQL: MLflow's backend store (runs, params, metrics) and the basic-auth
# user store. Private IP only (no public IP at all), reached from the MLflow Pod through the
# Cloud SQL Auth Proxy sidecar, which authenticates with IAM (Workload Identity) and encrypts
# with mTLS. The database password is generated here and kept in Secret Manager; it is never an
# output. It does live in Terraform state, so keep state in a private bucket (versions.tf).

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

# Letters and digits only: the password ends up in libpq's PGPASSWORD and must never need
# URL or INI escaping. 32 such characters are about 190 bits of entropy.
resource "random_password" "mlflow_db" {
  length  = 32
  special = false
}

resource "google_sql_user" "mlflow" {
  name     = "mlflow"
  instance = google_sql_database_instance.mlflow.name
  password = random_password.mlflow_db.result
}

resource "google_secret_manager_secret" "mlflow_db_password" {
  secret_id = "${var.cluster_name}-mlflow-db-password"

  replication {
    auto {}
  }

  depends_on = [google_project_service.apis]
}

resource "google_secret_manager_secret_version" "mlflow_db_password" {
  secret      = google_secret_manager_secret.mlflow_db_password.id
  secret_data = random_password.mlflow_db.result
}
