#!/usr/bin/env sh
# Install mergemix-pipeline as users get it: build the sdist and, from it, the wheel, then install
# the wheel (not editable) with the s3 extra. cluster/Dockerfile installs the project with exactly
# this script, and .ci/run runs it on every CI run before its installed-package smoke, so an image
# built from cluster/Dockerfile holds what CI tested.
#   cluster/install.sh [SOURCE_DIR [DIST_DIR]]
set -eu
src="${1:-.}"
dist="${2:-$(mktemp -d)}"
python -m pip install --quiet "build>=1.2"
python -m build --outdir "$dist" "$src" >/dev/null
python -m pip install --quiet "$(ls "$dist"/mergemix_pipeline-*.whl)[s3]"
echo "installed $(ls "$dist"/mergemix_pipeline-*.whl) (sdist: $(ls "$dist"/mergemix_pipeline-*.tar.gz))"
