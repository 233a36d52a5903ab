#!/usr/bin/env bash
# Builds the three images where Docker (with BuildKit) exists:
#
#   deploy/docker/build.sh [--pin] [--push] [REGISTRY [VERSION]]
#
#   tuneplex/platform  web, beat, default worker, migrations       (deploy/docker/platform.Dockerfile)
#   tuneplex/trainer   GPU worker (CUDA, trainer env, bitsandbytes),
#                      statistics worker                           (deploy/docker/trainer.Dockerfile)
#   tuneplex/engine    serving replica: official vLLM image + pool agent (deploy/docker/engine.Dockerfile)
#
# Base images are pinned by digest from deploy/docker/images.lock; --pin resolves the tags named
# in the Dockerfiles to their current digests and rewrites that file (commit it). Nothing secret
# goes into an image: .dockerignore keeps .env files and local state out of the build context.
set -euo pipefail
cd "$(dirname "$0")/../.."
PIN=0 PUSH=0
while [ $# -gt 0 ]; do
  case "$1" in
    --pin) PIN=1; shift ;;
    --push) PUSH=1; shift ;;
    *) break ;;
  esac
done
REGISTRY=${1:-tuneplex}
VERSION=${2:-$(git describe --tags --always 2>/dev/null || echo latest)}
LOCK=deploy/docker/images.lock
command -v docker >/dev/null || { echo "docker is required" >&2; exit 1; }

# ARG NAME=IMAGE:TAG lines of the Dockerfiles.
base_images() { grep -h '^ARG [A-Z_]*_IMAGE=' deploy/docker/*.Dockerfile | sed 's/^ARG //' | sort -u; }

if [ "$PIN" = 1 ]; then
  : > "$LOCK.new"
  while IFS='=' read -r name image; do
    docker pull --quiet "$image" >/dev/null
    digest=$(docker image inspect --format '{{index .RepoDigests 0}}' "$image")
    echo "$name=$digest" >> "$LOCK.new"
  done < <(base_images)
  mv "$LOCK.new" "$LOCK"
  echo "pinned base images in $LOCK"
fi

build_args=()
if [ -f "$LOCK" ]; then
  while IFS='=' read -r name ref; do
    [ -n "$name" ] && [ "${name#\#}" = "$name" ] && build_args+=(--build-arg "$name=$ref")
  done < "$LOCK"
else
  echo "warning: no $LOCK; building from tags (run with --pin to pin digests)" >&2
fi

for image in platform trainer engine; do
  tag="$REGISTRY/$image:$VERSION"
  echo "building $tag"
  DOCKER_BUILDKIT=1 docker build "${build_args[@]}" -f "deploy/docker/$image.Dockerfile" -t "$tag" .
  [ "$PUSH" = 1 ] && docker push "$tag"
done
