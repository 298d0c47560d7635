#!/usr/bin/env bash
# Installs every Debian 12 package vgpud needs to build, test and run the study.
# Idempotent: only missing packages are installed. README explains why each is here.
set -euo pipefail

PACKAGES=(
  meson ninja-build pkg-config g++ clang           # build; clang for the libFuzzer targets
  libclang-rt-14-dev                               # libFuzzer runtime for clang 14
  libfmt-dev nlohmann-json3-dev libcli11-dev doctest-dev
  libevent-dev                                     # event loop of the daemon
  libvulkan-dev mesa-vulkan-drivers vulkan-tools   # Vulkan loader + headers, lavapipe
  glslc spirv-tools                                # GLSL -> SPIR-V at build time
  libdrm-dev                                       # host GPU PCI address for the mdev parent name
  libseccomp-dev                                   # the worker's seccomp allow-list (sandbox/)
  libpng-dev                                       # vgpuctl screenshot's PNG (F10)
  libvncserver-dev                                 # each vGPU's VNC console (F10)
  vncsnapshot libjpeg-dev                          # tests: a real VNC client, and its JPEG read back
  libfuse3-dev fuse3                               # live mdev sysfs tree
  mdevctl util-linux                               # the real mdevctl, unshare for its namespace
  gnuplot-nox                                      # study plots
  prometheus                                       # tests: the real server scrapes vgpud --metrics
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
