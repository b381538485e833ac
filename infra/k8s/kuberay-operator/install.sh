#!/usr/bin/env bash
# Install or upgrade the KubeRay operator with the pinned chart version and values.yaml.
#
# The chart version matches the KubeRay CRD schemas the manifests in infra/k8s/ray are validated
# against (../shared/schemas/kuberay, see its README). The token-auth integration used by the
# RayJobs (spec.rayClusterSpec.authOptions) needs CRDs that have authOptions; this script checks
# that after installing and tells you if they do not.
set -euo pipefail

CHART_VERSION="1.1.0"
NAMESPACE="kuberay-system"
HERE="$(cd "$(dirname "$0")" && pwd)"

helm repo add kuberay https://ray-project.github.io/kuberay-helm/ >/dev/null
helm repo update kuberay >/dev/null
helm upgrade --install kuberay-operator kuberay/kuberay-operator \
  --version "${CHART_VERSION}" \
  --namespace "${NAMESPACE}" --create-namespace \
  --values "${HERE}/values.yaml" \
  --wait

if ! kubectl explain raycluster.spec.authOptions >/dev/null 2>&1; then
  echo "WARNING: the installed RayCluster CRD has no spec.authOptions." >&2
  echo "  Ray Pods still enforce token auth (RAY_AUTH_MODE/RAY_AUTH_TOKEN are set on them), but the" >&2
  echo "  operator cannot follow RayJobs on a token-protected cluster. Install a KubeRay release with" >&2
  echo "  authOptions (>= 1.5.1), e.g. the chart from the KubeRay commit named in" >&2
  echo "  ../shared/schemas/kuberay/README.md: helm upgrade --install kuberay-operator <kuberay>/helm-chart/kuberay-operator ..." >&2
fi
