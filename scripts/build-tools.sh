#!/usr/bin/env bash
# Build tools the crate needs besides Rust and gcc: cmake and nasm, which build the bundled
# libjpeg-turbo (turbojpeg-sys, linked statically; nasm for its SIMD). Installed from Debian when
# missing and running as root; otherwise says what to install and fails.
set -euo pipefail
missing=()
for tool in cmake nasm; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "build-tools.sh: installing ${missing[*]} (they build the bundled libjpeg-turbo)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "build-tools.sh: ${missing[*]} missing: install them (Debian: apt-get install cmake nasm); they build the bundled libjpeg-turbo" >&2
  exit 1
fi
