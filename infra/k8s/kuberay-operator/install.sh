#!/usr/bin/env bash
# Install or upgrade the KubeRay operator with the pinned chart version and values.yaml.
#
# Chart 1.7.0 installs the CRDs of the released KubeRay v1.7.0, the schemas the manifests in
# infra/k8s/ray are validated against (../shared/schemas/kuberay-1.7.0, tests/test_infra_k8s.py).
# They have spec.authOptions (token authentication) and gcsFaultToleranceOptions, which the Ray
# manifests use; the script stops if the installed CRD lacks them, e.g. because an older chart's
# CRDs were left behind (Helm never upgrades CRDs: apply them with `kubectl apply --server-side -f`
# from the chart's crds/ folder first).
set -euo pipefail

CHART_VERSION="1.7.0"
NAMESPACE="kuberay-system"
HERE="$(cd "$(dirname "$0")" && pwd)"

helm repo add kuberay https://ray-project.github.io/kuberay-helm/ >/dev/null
helm repo update kuberay >/dev/null
helm upgrade --install kuberay-operator kuberay/kuberay-operator \
  --version "${CHART_VERSION}" \
  --namespace "${NAMESPACE}" --create-namespace \
  --values "${HERE}/values.yaml" \
  --wait

for field in raycluster.spec.authOptions.secretName raycluster.spec.gcsFaultToleranceOptions rayjob.spec.backoffLimit; do
  if ! kubectl explain "${field}" >/dev/null 2>&1; then
    echo "ERROR: the installed KubeRay CRDs have no ${field}; they are older than chart ${CHART_VERSION}." >&2
    echo "  helm pull kuberay/kuberay-operator --version ${CHART_VERSION} --untar && kubectl apply --server-side -f kuberay-operator/crds/" >&2
    exit 1
  fi
done
