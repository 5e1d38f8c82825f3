#!/usr/bin/env bash
# Build the project's Docker image for real, run the digits demo and one paper experiment
# (Fig 1, --quick) inside it with the data folder mounted, and check the outputs on the host.
#
#   tests/docker/check_image.sh [DATA_DIR]          # DATA_DIR default: $INFLUENCE_DATA_DIR
#
# Engine: uses a running Docker engine; if none answers and dockerd is installed (Debian:
# apt-get install docker.io), starts one. Base image: BASE_IMAGE (default python:3.11-slim
# from Docker Hub); BASE_IMAGE=debootstrap builds a Debian bookworm base with Python 3.11 from
# Debian's package mirror (debootstrap, as root) and imports it with `docker import`, for
# machines that reach package registries but not Docker Hub. The host's CA bundle is copied
# into that base (and pip told to use it), so that pip inside the build trusts what the host
# trusts (e.g. a proxy's certificate).
# Exit 0: all checks passed; 77: skipped (no engine and none can be started).
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG=${TAG:-influence-repro:check}
DATA_DIR=$(realpath "${1:-${INFLUENCE_DATA_DIR:-$PWD/data}}")
start=$(date +%s)
if ! docker info >/dev/null 2>&1; then
    if command -v dockerd >/dev/null 2>&1; then
        echo "starting dockerd (log: /tmp/check_image_dockerd.log)"
        (dockerd >/tmp/check_image_dockerd.log 2>&1 &)
        for _ in $(seq 30); do docker info >/dev/null 2>&1 && break; sleep 1; done
    fi
    if ! docker info >/dev/null 2>&1; then
        echo "SKIPPED: no Docker engine answers 'docker info' and none could be started" >&2
        exit 77
    fi
fi
BASE=${BASE_IMAGE:-python:3.11-slim}
if [ "$BASE" = debootstrap ]; then
    if ! docker image inspect influence-base:bookworm >/dev/null 2>&1; then
        ROOT=$(mktemp -d)
        trap 'rm -rf "$ROOT"' EXIT
        debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
            bookworm "$ROOT" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
        rm -f "$ROOT"/usr/lib/python3*/EXTERNALLY-MANAGED  # the image's pip installs system-wide
        ln -sf python3 "$ROOT/usr/bin/python"
        cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
        printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$ROOT/etc/pip.conf"
        tar -C "$ROOT" -c . | docker import - influence-base:bookworm
    fi
    BASE=influence-base:bookworm
fi
docker build --network host --build-arg BASE_IMAGE="$BASE" -t "$TAG" .
docker run --rm "$TAG" python -c "import influence, inception; print('imports ok')"
OUT=$(mktemp -d)
chmod 0777 "$OUT"
for exp in demo_digits fig1_components; do
    docker run --rm --network none -v "$DATA_DIR":/data:ro -v "$OUT":/app/output "$TAG" \
        python scripts/reproduce_all.py --quick --only "$exp"
    test -s "$OUT/$exp/metrics.json"
    test -s "$OUT/$exp/$exp.png"
    test -s "$OUT/$exp/$exp.pdf"
    grep -q "| $exp | ok |" "$OUT/REPORT.md"
done
echo "docker image check passed: $TAG (base $BASE), outputs in $OUT, $(( $(date +%s) - start )) s"
