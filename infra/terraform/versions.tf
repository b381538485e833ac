# Terraform and provider versions.
#
# Each provider may move within one major version only: a new major version renames or drops
# arguments (tests/test_infra_provider_schema.py checks every argument against the google 6.x
# schema), so it must be an explicit upgrade: edit this file, `terraform init -upgrade`, read the plan.
#
# Lock file: the first `terraform init` writes .terraform.lock.hcl with the exact provider versions
# and their checksums. Commit it (it is not git-ignored), so that every later init, on any machine,
# installs the same bytes. Record checksums for every platform that runs terraform:
#   terraform -chdir=infra/terraform providers lock -platform=linux_amd64 -platform=darwin_arm64
# It is not in this repository because terraform cannot run where these files are checked.
terraform {
  required_version = ">= 1.5.0, < 2.0.0"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 6.14.0, < 7.0.0"
    }
    random = {
      source  = "hashicorp/random"
      version = ">= 3.6.0, < 4.0.0"
    }
  }

  # State holds the Memorystore AUTH string (an attribute of google_redis_instance), so keep it in a
  # private, versioned bucket rather than on a laptop. Create the bucket once by hand (see
  # README.md), then uncomment and run `terraform init -migrate-state`.
  # backend "gcs" {
  #   bucket = "<your-project>-tfstate"
  #   prefix = "vitpipe/infra"
  # }
}
