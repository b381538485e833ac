# Provider configuration. Credentials come from the caller's environment
# (`gcloud auth application-default login` on a workstation, Workload Identity Federation in CI);
# no key file is ever referenced here.
provider "google" {
  project = var.project_id
  region  = var.region

  # Every resource that supports labels gets these, so billing reports can be filtered by them.
  default_labels = local.labels
}

provider "random" {}
