#!/usr/bin/env bash
# Builds the test cluster's binaries from Go modules into a cache keyed by version:
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd, kwok
#   (one wrapper module, one `go build`, so shared packages compile once), Kueue's manager
#   with its CRDs and webhook manifests (a module of its own: it needs other k8s.io versions),
#   then helm and kubeconform for the chart tests. Prints the bin folder and Kueue's folder,
#   one a line. A second run is a no-op.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.36.3}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
HELM_VERSION=${HELM_VERSION:-v3.21.4}
KUBECONFORM_VERSION=${KUBECONFORM_VERSION:-v0.8.0}
KUEUE_VERSION=${KUEUE_VERSION:-v0.17.0}

cache=${LORASWEEP_CACHE:-$HOME/.cache/lorasweep}
# "-stamped": the binaries report their version (Kueue refuses an apiserver that says v0.0.0).
bin="$cache/bin/k8s-$K8S_VERSION-kwok-$KWOK_VERSION-stamped"
kueue="$cache/bin/kueue-$KUEUE_VERSION"
tools="$cache/bin/helm-$HELM_VERSION-kubeconform-$KUBECONFORM_VERSION"
cluster_bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok)

log() { echo "build-bins: $*" >&2; }

have_all() {
  local dir=$1; shift
  for b in "$@"; do [[ -x "$dir/$b" ]] || return 1; done
}

build_cluster_bins() {
  local src="$cache/src/k8s-$K8S_VERSION-kwok-$KWOK_VERSION"
  local staging="v0.${K8S_VERSION#v1.}"
  mkdir -p "$src/cmd/etcd" "$bin"
  go mod download -json "k8s.io/kubernetes@$K8S_VERSION" >/dev/null
  local k8s_mod
  k8s_mod="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$K8S_VERSION.mod"
  {
    echo "module lorasweep.dev/clusterbins"
    echo
    echo "go 1.26"
    echo
    echo "require ("
    echo "	k8s.io/kubernetes $K8S_VERSION"
    echo "	sigs.k8s.io/kwok $KWOK_VERSION"
    echo ")"
    echo
    # k8s.io/kubernetes points its staging modules at ./staging; a module that depends on it
    # has to name their published versions instead.
    echo "replace ("
    sed -nE 's#^\s*(k8s\.io/[a-z0-9-]+) => \./staging/src/.*#\t\1 => \1 '"$staging"'#p' "$k8s_mod"
    echo ")"
  } >"$src/go.mod"
  # etcd ships no installable main package; etcdmain is the one its own binary calls.
  cat >"$src/cmd/etcd/main.go" <<'EOF'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  log "building ${cluster_bins[*]} (k8s $K8S_VERSION, kwok $KWOK_VERSION); the first build takes many minutes"
  (
    cd "$src"
    export GOFLAGS=-mod=mod CGO_ENABLED=0
    # What `make release` stamps into Kubernetes' binaries; unstamped, /version says v0.0.0.
    local minor="${K8S_VERSION#v1.}"
    local version=k8s.io/component-base/version
    go build -trimpath -o "$bin/" -ldflags="-s -X $version.gitVersion=$K8S_VERSION \
      -X $version.gitMajor=1 -X $version.gitMinor=${minor%%.*} -X $version.gitTreeState=clean" \
      k8s.io/kubernetes/cmd/kube-apiserver \
      k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler \
      k8s.io/kubernetes/cmd/kubectl \
      sigs.k8s.io/kwok/cmd/kwok \
      ./cmd/etcd
  )
}

# The manager binary, and beside it what the dev cluster installs from the same module version:
# the CRDs and the webhook manifests (copied, so a cleaned module cache does not break them).
build_kueue() {
  log "building kueue $KUEUE_VERSION; the first build takes a few minutes"
  mkdir -p "$kueue/crds"
  GOBIN="$kueue" CGO_ENABLED=0 go install -trimpath -ldflags=-s \
    "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION"
  local mod
  mod="$(go env GOMODCACHE)/sigs.k8s.io/kueue@$KUEUE_VERSION"
  cp "$mod"/config/components/crd/bases/*.yaml "$kueue/crds/"
  cp "$mod/config/components/webhook/manifests.yaml" "$kueue/webhooks.yaml"
  chmod -R u+w "$kueue"
}

build_tools() {
  mkdir -p "$tools"
  log "building helm $HELM_VERSION and kubeconform $KUBECONFORM_VERSION"
  GOBIN="$tools" CGO_ENABLED=0 go install -trimpath -ldflags=-s \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  GOBIN="$tools" CGO_ENABLED=0 go install -trimpath -ldflags=-s \
    "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
}

have_all "$bin" "${cluster_bins[@]}" || build_cluster_bins
[[ -x "$kueue/kueue" && -f "$kueue/webhooks.yaml" ]] || build_kueue
if [[ "${LORASWEEP_SKIP_TOOLS:-}" != 1 ]]; then
  have_all "$tools" helm kubeconform || build_tools
fi
echo "$bin"
echo "$kueue"
