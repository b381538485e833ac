# Terraform and provider versions.
#
# Ranges are bounded on both sides: a new major version of a provider can rename or drop
# arguments, so it must be an explicit upgrade (edit this file, run `terraform init -upgrade`,
# read the plan) rather than something a fresh `terraform init` picks up silently.
terraform {
  required_version = ">= 1.5.0, < 2.0.0"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 6.14.0, < 8.0.0"
    }
    random = {
      source  = "hashicorp/random"
      version = ">= 3.6.0, < 4.0.0"
    }
  }

  # State holds the generated database password (random_password), so keep it in a private,
  # versioned bucket rather than on a laptop. Create the bucket once by hand (see README.md),
  # then uncomment and run `terraform init -migrate-state`.
  # backend "gcs" {
  #   bucket = "<your-project>-tfstate"
  #   prefix = "vitpipe/infra"
  # }
}
