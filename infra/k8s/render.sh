#!/usr/bin/env bash
# Fill the ${PLACEHOLDERS} of the manifests in this folder with values from `terraform output`
# and write the result to infra/k8s/rendered/ (git-ignored), ready for `kubectl apply`.
#
#   infra/k8s/render.sh                      # reads infra/terraform's outputs
#   TRAIN_DATA=jft/train.manifest.json PRETRAINED_URI=gs://... infra/k8s/render.sh
#
# Any variable already set in the environment wins over the terraform output, so the script also
# works without terraform state (set them all by hand). It fails if a placeholder is left unfilled.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
TF_DIR="${TF_DIR:-${HERE}/../terraform}"
OUT="${HERE}/rendered"

tf_output() {
  terraform -chdir="${TF_DIR}" output -raw "$1"
}

: "${REGISTRY:=$(tf_output image_registry)}"
: "${RAY_GSA_EMAIL:=$(tf_output ray_service_account_email)}"
: "${MLFLOW_GSA_EMAIL:=$(tf_output mlflow_service_account_email)}"
: "${SHARDS_BUCKET:=$(tf_output shards_bucket)}"
: "${CHECKPOINTS_BUCKET:=$(tf_output checkpoints_bucket)}"
: "${MLFLOW_ARTIFACTS_BUCKET:=$(tf_output mlflow_artifacts_bucket)}"
: "${CLOUDSQL_CONNECTION_NAME:=$(tf_output cloudsql_connection_name)}"
# MLflow's PostgreSQL user is its service account (IAM database authentication); '@' must be
# URL-encoded inside a postgresql:// URI.
: "${MLFLOW_DB_USER_URI:=$(tf_output mlflow_db_user | sed 's/@/%40/g')}"
# Memorystore (Ray GCS fault tolerance) and the peered range holding it and Cloud SQL (egress policies).
: "${REDIS_ADDRESS:=$(tf_output redis_address)}"
: "${PRIVATE_SERVICES_CIDR:=$(tf_output private_services_cidr)}"
# Where the training shards are, relative to the shards bucket (what jobs/prepare_data.py wrote).
: "${TRAIN_DATA:=jft/train.manifest.json}"
# What the transfer job fine-tunes: by default the export of the vit_h14_jft pretraining run.
: "${PRETRAINED_URI:=gs://${CHECKPOINTS_BUCKET}/runs/vit_h14_jft/export}"

VARS=(REGISTRY RAY_GSA_EMAIL MLFLOW_GSA_EMAIL SHARDS_BUCKET CHECKPOINTS_BUCKET
      MLFLOW_ARTIFACTS_BUCKET CLOUDSQL_CONNECTION_NAME MLFLOW_DB_USER_URI REDIS_ADDRESS
      PRIVATE_SERVICES_CIDR TRAIN_DATA PRETRAINED_URI)

rm -rf "${OUT}"
cd "${HERE}"
find . -path ./rendered -prune -o -path ./kuberay-operator -prune -o -name '*.yaml' -print | while read -r src; do
  text="$(cat "${src}")"
  for name in "${VARS[@]}"; do
    text="${text//"\${${name}}"/${!name}}"
  done
  if grep -q '\${[A-Z_]*}' <<<"${text}"; then
    echo "unfilled placeholder in ${src}: $(grep -o '\${[A-Z_]*}' <<<"${text}" | sort -u | tr '\n' ' ')" >&2
    exit 1
  fi
  mkdir -p "${OUT}/$(dirname "${src}")"
  printf '%s\n' "${text}" > "${OUT}/${src}"
done
echo "rendered manifests in ${OUT}"
