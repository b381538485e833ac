# GCS buckets: WebDataset shards, training checkpoints, MLflow artifacts, and one bucket that
# receives the access logs of the other three. All are private (uniform bucket-level access,
# public access prevention enforced), versioned, and have lifecycle rules so that old versions
# and abandoned uploads do not pile up on the bill. Access is granted per bucket in iam.tf.

resource "google_storage_bucket" "access_logs" {
  #checkov:skip=CKV_GCP_62:This bucket is the access-log sink of the other buckets; logging it into itself or a fifth bucket adds nothing.
  name          = local.bucket_names.access_logs
  location      = var.region
  storage_class = "STANDARD"
  force_destroy = var.force_destroy_buckets

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      age = var.access_log_retention_days
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = 7
    }
    action {
      type = "Delete"
    }
  }

  lifecycle {
    precondition {
      condition     = length(local.bucket_names.access_logs) <= 63
      error_message = "GCS bucket names have at most 63 characters: shorten cluster_name."
    }
  }

  depends_on = [google_project_service.apis]
}

# GCS writes usage logs as this Google-owned group; it only needs to create objects here.
resource "google_storage_bucket_iam_member" "access_logs_writer" {
  bucket = google_storage_bucket.access_logs.name
  role   = "roles/storage.objectCreator"
  member = "group:cloud-storage-analytics@google.com"
}

# WebDataset shards (gs://<this bucket>/<dataset>/shard-000000.tar ...). Written once by
# jobs/prepare_data.py, read many times by training.
resource "google_storage_bucket" "shards" {
  name          = local.bucket_names.shards
  location      = var.region
  storage_class = "STANDARD"
  force_destroy = var.force_destroy_buckets

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  # Versioning protects against an accidental overwrite or `gsutil rm -r`; the rule below drops
  # old versions after a week, so re-sharding a dataset does not double its cost for long.
  versioning {
    enabled = true
  }

  logging {
    log_bucket        = google_storage_bucket.access_logs.name
    log_object_prefix = "shards/"
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.shards_noncurrent_days
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      age = 1
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  lifecycle {
    precondition {
      condition     = length(local.bucket_names.shards) <= 63
      error_message = "GCS bucket names have at most 63 characters: shorten cluster_name."
    }
  }

  depends_on = [google_project_service.apis]
}

# DeepSpeed checkpoints (tens of GB each for ViT-H/14 with optimizer state). Versioning is on
# so that a crash while a checkpoint is being replaced can never destroy the last good one.
resource "google_storage_bucket" "checkpoints" {
  name          = local.bucket_names.checkpoints
  location      = var.region
  storage_class = "STANDARD"
  force_destroy = var.force_destroy_buckets

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  versioning {
    enabled = true
  }

  logging {
    log_bucket        = google_storage_bucket.access_logs.name
    log_object_prefix = "checkpoints/"
  }

  # Keep at most 3 older versions of any object, and none older than checkpoint_noncurrent_days.
  lifecycle_rule {
    condition {
      num_newer_versions = 3
      with_state         = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.checkpoint_noncurrent_days
    }
    action {
      type = "Delete"
    }
  }

  # Finished runs' checkpoints are rarely read again: move them to a cheaper class.
  lifecycle_rule {
    condition {
      age                   = var.checkpoint_nearline_after_days
      matches_storage_class = ["STANDARD"]
    }
    action {
      type          = "SetStorageClass"
      storage_class = "NEARLINE"
    }
  }

  lifecycle_rule {
    condition {
      age = 1
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  lifecycle {
    precondition {
      condition     = length(local.bucket_names.checkpoints) <= 63
      error_message = "GCS bucket names have at most 63 characters: shorten cluster_name."
    }
  }

  depends_on = [google_project_service.apis]
}

# MLflow artifacts (models, plots, logged files). Only the MLflow server writes here: clients
# upload through it (`--serve-artifacts`), so Ray Pods need no access to this bucket.
resource "google_storage_bucket" "mlflow_artifacts" {
  name          = local.bucket_names.mlflow_artifacts
  location      = var.region
  storage_class = "STANDARD"
  force_destroy = var.force_destroy_buckets

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  versioning {
    enabled = true
  }

  logging {
    log_bucket        = google_storage_bucket.access_logs.name
    log_object_prefix = "mlflow-artifacts/"
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = 30
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      age = 1
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  lifecycle {
    precondition {
      condition     = length(local.bucket_names.mlflow_artifacts) <= 63
      error_message = "GCS bucket names have at most 63 characters: shorten cluster_name."
    }
  }

  depends_on = [google_project_service.apis]
}
