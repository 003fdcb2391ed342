#!/usr/bin/env bash
# Submit `generate` to a running Ray cluster as a job:
#   cluster/submit.sh http://HEAD:8265 --input ... --output /shared/out --pretrained /shared/ckpt.pt
# RAY_AUTH_TOKEN must hold the cluster's token when token authentication is on
# (`ray get-auth-token` on the head prints it).
set -euo pipefail
address="${1:?usage: cluster/submit.sh DASHBOARD_ADDRESS GENERATE_FLAGS...}"
shift
cd "$(dirname "$0")/.."
exec ray job submit --address "$address" --working-dir . --runtime-env cluster/runtime_env.yaml \
    -- mergemix-pipeline generate "$@"
