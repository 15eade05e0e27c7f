#!/usr/bin/env bash
# Builds the harness images with Docker or Podman:
#   harness-images/build.sh [--engine docker|podman] [--binary PATH | --from-source]
#                           [--bootstrap-base] [NAME...]
# NAME is base, node or a harness directory here (echo, shell, opencode, ...); default: all, in
# dependency order (base, then node, which the CLI images build on). Images are tagged
# sandwarden/harness-NAME:VERSION (VERSION from Cargo.toml), the names the templates use. A
# directory with only a `package` file is built from agent-cli/Dockerfile with that npm package
# at the version harnesses/package.json pins (the same pins as the local templates).
#   --binary PATH     the sandwarden binary to put in the base image (default target/release/sandwarden);
#                     it is built on the host (Debian 12) and copied in: Dockerfile.prebuilt, with
#                     sandwarden-harness from beside it (the same build makes both).
#   --from-source     build the base from source in a Rust image instead (base/Dockerfile).
#   --bootstrap-base  where no registry is reachable: create docker.io/library/debian:bookworm-slim
#                     locally with debootstrap (root, Debian's debootstrap package) if it is missing.
#   --ca-bundle FILE  CAs the node image trusts besides Debian's (a TLS-intercepting proxy's).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
engine=""; binary="$root/target/release/sandwarden"; from_source=0; bootstrap=0; ca_bundle=""; names=()
while [ $# -gt 0 ]; do
  case "$1" in
    --engine) engine=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    --from-source) from_source=1; shift ;;
    --bootstrap-base) bootstrap=1; shift ;;
    --ca-bundle) ca_bundle=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) names+=("$1"); shift ;;
  esac
done
if [ -z "$engine" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then engine=docker
  elif command -v podman >/dev/null 2>&1; then engine=podman
  else echo "neither docker nor podman is available: install one (Debian: apt-get install podman)" >&2; exit 1; fi
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n1)
if [ ${#names[@]} -eq 0 ]; then
  names=(base node)
  for d in "$here"/*/; do
    n=$(basename "$d")
    case "$n" in base|node|agent-cli) ;; *) names+=("$n") ;; esac
  done
fi

# The pinned version of an npm package, from harnesses/package.json.
pinned() {
  local v
  v=$(sed -n "s/^ *\"$(printf '%s' "$1" | sed 's/[\/&.@]/\\&/g')\": *\"\([^\"]*\)\".*/\1/p" "$root/harnesses/package.json")
  [ -n "$v" ] || { echo "$1 is not pinned in harnesses/package.json" >&2; exit 1; }
  printf '%s' "$v"
}

base_image=docker.io/library/debian:bookworm-slim
ensure_base() {
  "$engine" image inspect "$base_image" >/dev/null 2>&1 && return 0
  if [ "$bootstrap" = 1 ]; then
    command -v debootstrap >/dev/null 2>&1 || { echo "--bootstrap-base needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
    rootfs=$(mktemp -d)
    echo "bootstrapping $base_image with debootstrap (about 30 s)"
    debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
    tar -C "$rootfs" -c . | "$engine" import - "$base_image" >/dev/null
    rm -rf "$rootfs"
  fi
}

build_base() {
  ensure_base
  if [ "$from_source" = 1 ]; then
    "$engine" build -f "$here/base/Dockerfile" -t "sandwarden/harness-base:$version" "$root"
    return
  fi
  [ -x "$binary" ] || { echo "no sandwarden binary at $binary: run cargo build --release, or pass --binary PATH" >&2; exit 1; }
  harness="$(dirname "$binary")/sandwarden-harness"
  [ -x "$harness" ] || { echo "no sandwarden-harness beside $binary: run cargo build (it builds both binaries)" >&2; exit 1; }
  ctx=$(mktemp -d)
  trap 'rm -rf "$ctx"' RETURN
  strip -o "$ctx/sandwarden" "$binary" 2>/dev/null || cp "$binary" "$ctx/sandwarden"
  strip -o "$ctx/sandwarden-harness" "$harness" 2>/dev/null || cp "$harness" "$ctx/sandwarden-harness"
  cp "$here/base/Dockerfile.prebuilt" "$ctx/Dockerfile"
  "$engine" build -q -t "sandwarden/harness-base:$version" "$ctx" >/dev/null
}

for name in "${names[@]}"; do
  start=$(date +%s)
  if [ "$name" = base ]; then
    build_base
  else
    [ -f "$here/$name/Dockerfile" ] || [ -f "$here/$name/package" ] || { echo "no image named $name (directories: $(ls "$here" | tr '\n' ' '))" >&2; exit 2; }
    args=(--build-arg "VERSION=$version")
    if [ -f "$here/$name/package" ]; then
      pkg=$(tr -d '[:space:]' < "$here/$name/package")
      args+=(--build-arg "PACKAGE=$pkg@$(pinned "$pkg")")
    fi
    ctx=$(mktemp -d)
    cp -r "$here/$name/." "$ctx/"
    [ -f "$ctx/Dockerfile" ] || cp "$here/agent-cli/Dockerfile" "$ctx/Dockerfile"
    if [ "$name" = node ]; then
      if [ -n "$ca_bundle" ]; then cp "$ca_bundle" "$ctx/extra-ca.crt"; else : > "$ctx/extra-ca.crt"; fi
    fi
    "$engine" build -q "${args[@]}" -t "sandwarden/harness-$name:$version" "$ctx" >/dev/null
    rm -rf "$ctx"
  fi
  echo "built sandwarden/harness-$name:$version in $(( $(date +%s) - start )) s"
done
