#!/usr/bin/env bash
# End-to-end test on a real Kubernetes (kind, or k3d with E2E_RUNTIME=k3d): build the image,
# install the chart, wait for the PbftCluster to be Ready with every replica, put and get a
# key through port-forwards with the pbft CLI, check the client Service, then restart the
# StatefulSet under the rollout rules and read the key again. `make e2e` runs this.
#
# It cannot run on the CI machines (no Kubernetes there: CI runs scripts/k8s_validate.py and
# scripts/dashboards_check.py instead); it needs docker, kind (or k3d), kubectl, helm, cargo.
#
# Environment: E2E_CLUSTER (pbft-e2e), E2E_NAMESPACE (pbft-e2e), E2E_IMAGE (pbft:0.1.0),
# E2E_RUNTIME (kind | k3d), E2E_KEEP=1 keeps the Kubernetes cluster afterwards,
# E2E_REUSE=1 uses an existing cluster of that name, E2E_SKIP_BUILD=1 uses an existing image
# (e.g. from `make image`) instead of `docker build`, E2E_TIMEOUT (per wait, default 300 s).
set -euo pipefail

CLUSTER=${E2E_CLUSTER:-pbft-e2e}
NS=${E2E_NAMESPACE:-pbft-e2e}
IMAGE=${E2E_IMAGE:-pbft:0.1.0}
RUNTIME=${E2E_RUNTIME:-kind}
TIMEOUT=${E2E_TIMEOUT:-300}
RELEASE=pbft
NAME=pbft            # the chart's default cluster.name
REPLICAS=4
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d -t pbft-e2e.XXXXXX)
CTX=
PF_PIDS=()
CREATED=0

log() { printf '\n== %s\n' "$*"; }
die() { printf 'e2e: FAIL: %s\n' "$*" >&2; exit 1; }

cleanup() {
  local rc=$?
  for pid in "${PF_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PF_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ $rc -ne 0 && -n "$CTX" ]]; then
    echo "--- diagnostics (exit $rc)" >&2
    kubectl --context "$CTX" -n "$NS" get pbftclusters,statefulsets,pods,pvc,svc -o wide >&2 || true
    kubectl --context "$CTX" -n "$NS" describe pbftcluster "$NAME" >&2 || true
    kubectl --context "$CTX" -n "$NS" logs deploy/${RELEASE}-controller --tail=50 >&2 || true
    for i in $(seq 0 $((REPLICAS - 1))); do
      kubectl --context "$CTX" -n "$NS" logs "$NAME-$i" --tail=20 >&2 || true
    done
  fi
  if [[ $CREATED -eq 1 && "${E2E_KEEP:-0}" != 1 ]]; then
    log "deleting $RUNTIME cluster $CLUSTER"
    if [[ $RUNTIME == k3d ]]; then k3d cluster delete "$CLUSTER" || true; else kind delete cluster --name "$CLUSTER" || true; fi
  elif [[ $CREATED -eq 1 ]]; then
    echo "kept cluster $CLUSTER (context $CTX); delete it with: $RUNTIME delete cluster --name $CLUSTER"
  fi
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- tools
need=(docker kubectl helm cargo curl base64)
case $RUNTIME in
  kind) need+=(kind) ;;
  k3d) need+=(k3d) ;;
  *) die "E2E_RUNTIME must be kind or k3d, not $RUNTIME" ;;
esac
for t in "${need[@]}"; do
  command -v "$t" >/dev/null || die "$t is not installed (needed: ${need[*]})"
done
docker info >/dev/null 2>&1 || die "the docker daemon is not reachable"
helm version --short | grep -Eq '^v(3\.1[4-9]|3\.[2-9][0-9]|4\.)' || echo "warning: helm $(helm version --short) is older than tested (3.14+, 4.x)"

k() { kubectl --context "$CTX" -n "$NS" "$@"; }

# --- cluster
if [[ "${E2E_REUSE:-0}" == 1 ]]; then
  log "reusing $RUNTIME cluster $CLUSTER"
else
  log "creating $RUNTIME cluster $CLUSTER"
  if [[ $RUNTIME == k3d ]]; then
    k3d cluster list "$CLUSTER" >/dev/null 2>&1 && die "a k3d cluster $CLUSTER exists: delete it or set E2E_REUSE=1"
    k3d cluster create "$CLUSTER" --agents 3 --wait --timeout "${TIMEOUT}s"
  else
    kind get clusters 2>/dev/null | grep -qx "$CLUSTER" && die "a kind cluster $CLUSTER exists: delete it or set E2E_REUSE=1"
    # Three workers, so the replicas' preferred anti-affinity can spread them.
    cat > "$WORK/kind.yaml" <<'EOF'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
  - role: worker
  - role: worker
EOF
    kind create cluster --name "$CLUSTER" --config "$WORK/kind.yaml" --wait "${TIMEOUT}s"
  fi
  CREATED=1
fi
if [[ $RUNTIME == k3d ]]; then CTX="k3d-$CLUSTER"; else CTX="kind-$CLUSTER"; fi
kubectl --context "$CTX" version >/dev/null || die "cannot reach the API server of context $CTX"

# --- image and CLI
if [[ "${E2E_SKIP_BUILD:-0}" == 1 ]]; then
  log "using the existing image $IMAGE (E2E_SKIP_BUILD=1, e.g. after make image)"
  docker image inspect "$IMAGE" >/dev/null 2>&1 || die "image $IMAGE does not exist"
else
  log "building $IMAGE"
  docker build -t "$IMAGE" "$ROOT"
fi
log "building the pbft CLI"
if [[ $RUNTIME == k3d ]]; then k3d image import "$IMAGE" -c "$CLUSTER"; else kind load docker-image "$IMAGE" --name "$CLUSTER"; fi
(cd "$ROOT" && cargo build -q -p pbft-client)
PBFT="$ROOT/target/debug/pbft"

# --- install
log "helm install $RELEASE into $NS"
helm --kube-context "$CTX" install "$RELEASE" "$ROOT/deploy/helm/pbft" \
  --namespace "$NS" --create-namespace \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" \
  --set image.pullPolicy=Never --set cluster.imagePullPolicy=Never \
  --wait --timeout "${TIMEOUT}s"
k rollout status "deploy/${RELEASE}-controller" --timeout "${TIMEOUT}s"

log "waiting for PbftCluster $NAME: condition Ready and $REPLICAS ready replicas"
k wait "pbftcluster/$NAME" --for=condition=Ready --timeout "${TIMEOUT}s"
deadline=$((SECONDS + TIMEOUT))
until [[ "$(k get pbftcluster "$NAME" -o jsonpath='{.status.readyReplicas}')" == "$REPLICAS" ]]; do
  (( SECONDS < deadline )) || die "readyReplicas did not reach $REPLICAS in ${TIMEOUT}s"
  sleep 2
done
k get pbftcluster "$NAME"
k get pdb "$NAME" -o jsonpath='{.spec.maxUnavailable}' | grep -qx 1 || die "PDB maxUnavailable is not f=1"

# --- port-forwards: one per replica (the client needs f+1 matching answers from distinct
# replicas), and one to the client Service.
port_forward() { # target local:remote
  k port-forward "$1" "$2" >"$WORK/pf-${1//\//-}.log" 2>&1 &
  PF_PIDS+=($!)
}
wait_port() { # port
  local end=$((SECONDS + 30))
  until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
    (( SECONDS < end )) || die "port-forward to 127.0.0.1:$1 did not open in 30 s"
    sleep 0.5
  done
}
start_forwards() {
  for pid in "${PF_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  PF_PIDS=()
  for i in $(seq 0 $((REPLICAS - 1))); do
    port_forward "pod/$NAME-$i" "$((17000 + i)):7000"
    port_forward "pod/$NAME-$i" "$((18000 + i)):8000"
  done
  port_forward "svc/$NAME" "19000:8000"
  for i in $(seq 0 $((REPLICAS - 1))); do wait_port $((17000 + i)); wait_port $((18000 + i)); done
  wait_port 19000
}

log "port-forwarding the replicas and the client Service"
start_forwards

# The CLI's cluster directory: cluster.yaml with the forwarded addresses and the replicas'
# public keys, plus the operator client's key (client id 1), all from the keys Secret.
secret_entry() { k get secret "$NAME-keys" -o "jsonpath={.data.${1//./\\.}}" | base64 -d; }
DATA="$WORK/cli"
mkdir -p "$DATA/keys"
secret_entry client-1.key > "$DATA/keys/client-1.key"
chmod 600 "$DATA/keys/client-1.key"
{
  echo "transport: grpc"
  echo "replicas:"
  for i in $(seq 0 $((REPLICAS - 1))); do
    echo "  - id: $i"
    echo "    listen: 127.0.0.1:$((17000 + i))"
    echo "    client: 127.0.0.1:$((17000 + i))"
    echo "    http: 127.0.0.1:$((18000 + i))"
    echo "    public_key: $(secret_entry "replica-$i.pub")"
  done
  echo "client_id: 1"
  echo "load_clients: []"
} > "$DATA/cluster.yaml"

log "put/get through the replicas"
VALUE="hello-$(date +%s)"
timeout 60 "$PBFT" --data "$DATA" --timeout 20 put e2e-key "$VALUE"
got=$(timeout 60 "$PBFT" --data "$DATA" --timeout 20 --output json get e2e-key)
grep -q "$VALUE" <<<"$got" || die "get e2e-key returned $got, expected $VALUE"
timeout 60 "$PBFT" --data "$DATA" status
timeout 120 "$PBFT" --data "$DATA" verify-ledger --replica 0

log "the client Service answers /readyz and /status"
curl -fsS --max-time 5 http://127.0.0.1:19000/readyz
curl -fsS --max-time 5 http://127.0.0.1:19000/status | grep -q '"height"' || die "no /status through svc/$NAME"

log "rolling restart, one pod at a time, gated by /readyz"
k rollout restart "statefulset/$NAME"
k rollout status "statefulset/$NAME" --timeout "$((TIMEOUT * 2))s"
k wait "pbftcluster/$NAME" --for=condition=Ready --timeout "${TIMEOUT}s"
start_forwards
got=$(timeout 60 "$PBFT" --data "$DATA" --timeout 20 --output json get e2e-key)
grep -q "$VALUE" <<<"$got" || die "after the restart get e2e-key returned $got, expected $VALUE"
timeout 60 "$PBFT" --data "$DATA" --timeout 20 put e2e-key-2 after-restart

log "refused resize: spec.replicas 7 on a running cluster"
k patch pbftcluster "$NAME" --type merge -p '{"spec":{"replicas":7}}'
deadline=$((SECONDS + 60))
until [[ "$(k get pbftcluster "$NAME" -o jsonpath='{.status.conditions[?(@.type=="Degraded")].reason}')" == ReconfigurationRefused ]]; do
  (( SECONDS < deadline )) || die "no Degraded/ReconfigurationRefused after changing spec.replicas"
  sleep 2
done
[[ "$(k get statefulset "$NAME" -o jsonpath='{.spec.replicas}')" == "$REPLICAS" ]] || die "the StatefulSet was resized"
k patch pbftcluster "$NAME" --type merge -p "{\"spec\":{\"replicas\":$REPLICAS}}"

log "e2e: PASS"
