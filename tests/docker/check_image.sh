#!/usr/bin/env bash
# Build the project's Docker image for real and run its default command on the digits demo.
#
#   tests/docker/check_image.sh [DATA_DIR]
#
# Needs a running Docker engine (`docker info` must answer). Where Docker Hub is reachable the
# Dockerfile's default base (python:3.11-slim) is used; with BASE_IMAGE=debootstrap a Debian
# bookworm base with Python 3.11 is built from Debian's package mirror (debootstrap, as root)
# and imported with `docker import`, for machines that reach only the package registries.
# Checks: the image builds; `python -c "import influence, inception"` works inside; the
# default command (reproduce_all --quick --only demo_digits) writes a REPORT.md whose demo row
# is "ok" into the mounted output folder, readable by the caller. Exit 0 = all checks passed;
# 77 = skipped (no engine).
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG=${TAG:-influence-repro:check}
DATA_DIR=${1:-${INFLUENCE_DATA_DIR:-$PWD/data}}
if ! docker info >/dev/null 2>&1; then
    echo "SKIPPED: no Docker engine answers 'docker info' on this machine" >&2
    exit 77
fi
BASE=${BASE_IMAGE:-python:3.11-slim}
if [ "$BASE" = debootstrap ]; then
    ROOT=$(mktemp -d)
    trap 'rm -rf "$ROOT"' EXIT
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
        bookworm "$ROOT" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
    # Debian marks its Python as externally managed; the image's pip installs system-wide
    rm -f "$ROOT"/usr/lib/python3*/EXTERNALLY-MANAGED
    ln -sf python3 "$ROOT/usr/bin/python"
    tar -C "$ROOT" -c . | docker import - influence-base:bookworm
    BASE=influence-base:bookworm
fi
docker build --build-arg BASE_IMAGE="$BASE" -t "$TAG" .
docker run --rm "$TAG" python -c "import influence, inception; print('imports ok')"
OUT=$(mktemp -d)
chmod 0777 "$OUT"
docker run --rm -v "$(realpath "$DATA_DIR")":/data:ro -v "$OUT":/app/output "$TAG" \
    python scripts/reproduce_all.py --quick --only demo_digits
grep -q "| demo_digits | ok |" "$OUT/REPORT.md"
test -r "$OUT/demo_digits/metrics.json"
echo "docker image check passed: $TAG (base $BASE)"
