#!/usr/bin/env bash
# wsgate against no proxy, a bare TCP relay, HAProxy and NGINX, in one run on this
# machine, then wss against HAProxy terminating TLS: installs HAProxy and NGINX
# (Debian's packages) when missing, builds in release mode and prints two tables
# with the targets' ratios.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "compare.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "compare.sh: needs ${missing[*]} (sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

# The idle scenario holds ~9,900 connections per process: use the whole limit.
ulimit -n "$(ulimit -Hn)"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)" >&2
echo "versions: $(haproxy -v | head -1 | cut -d' ' -f1-3), $(nginx -v 2>&1 | cut -d' ' -f3)" >&2
cargo bench --bench loadgen -- "$@"
# TLS termination against HAProxy with the same ECDSA P-256 certificate.
cargo bench --bench tls
