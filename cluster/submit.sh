#!/usr/bin/env bash
# Submit `generate` to a running Ray cluster as a job:
#   cluster/submit.sh http://HEAD:8265 --input s3://bucket/llava.json --image-root s3://bucket/images \
#       --output s3://bucket/out --pretrained s3://bucket/ViT-L-14-336-openai.bin --quick-gelu
# RAY_AUTH_TOKEN must hold the cluster's token when token authentication is on
# (`ray get-auth-token` on the head prints it).
set -euo pipefail
address="${1:?usage: cluster/submit.sh DASHBOARD_ADDRESS GENERATE_FLAGS...}"
shift
cd "$(dirname "$0")/.."
exec ray job submit --address "$address" --working-dir . --runtime-env cluster/runtime_env.yaml \
    -- mergemix-pipeline generate "$@"
