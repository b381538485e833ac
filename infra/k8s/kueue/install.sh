#!/usr/bin/env bash
# Install Kueue at the pinned version from its release manifests, then the project's queues.
#
# Kueue's default configuration enables the KubeRay integrations (ray.io/rayjob, ray.io/raycluster)
# that infra/k8s/ray relies on. Its controller image, registry.k8s.io/kueue/kueue:v${KUEUE_VERSION},
# is admitted by Binary Authorization (local.external_images in infra/terraform/locals.tf).
set -euo pipefail

KUEUE_VERSION="0.13.4"
HERE="$(cd "$(dirname "$0")" && pwd)"

kubectl apply --server-side \
  -f "https://github.com/kubernetes-sigs/kueue/releases/download/v${KUEUE_VERSION}/manifests.yaml"
kubectl -n kueue-system rollout status deployment/kueue-controller-manager --timeout=300s
# The webhook must answer before queues can be created.
kubectl -n kueue-system wait --for=condition=Available deployment/kueue-controller-manager --timeout=300s
kubectl apply -f "${HERE}/queues.yaml"
