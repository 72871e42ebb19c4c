#!/usr/bin/env bash
# Install everything moat's build and tests need on a fresh Debian machine.
# Idempotent: each step checks first and prints nothing when already done.
set -euo pipefail

BPF_LINKER_VERSION=0.13.0
LLVM_MAJOR=22
APT_PACKAGES=(
  "llvm-${LLVM_MAJOR}-dev"   # bpf-linker links against this LLVM (must match nightly's)
  iproute2                   # ip netns / ip link for namespace tests and the demo
  ethtool                    # turning tx offload / gro on test veths
  make
  gcc                        # builds mimalloc (the daemon's allocator); rustc links with it
  xdp-tools                  # xdp-filter: a peer in the benchmark suite
  nftables                   # nft: a peer in the benchmark suite
  iptables                   # iptables-legacy: a peer in the benchmark suite
)

say() { printf 'setup: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: must run as root (apt-get, namespaces, BPF)" >&2
  exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { echo "setup: apt-get install ${missing[*]} failed" >&2; exit 1; }
fi

if ! rustup toolchain list | grep -q '^nightly'; then
  say "installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal >/dev/null 2>&1
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  say "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly >/dev/null 2>&1
fi
for c in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$c"; then
    say "adding $c to stable"
    rustup component add "$c" >/dev/null 2>&1
  fi
done
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^clippy'; then
  say "adding clippy to nightly"
  rustup component add clippy --toolchain nightly >/dev/null 2>&1
fi

if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  say "building bpf-linker $BPF_LINKER_VERSION against LLVM $LLVM_MAJOR (about a minute)"
  LLVM_PREFIX="/usr/lib/llvm-${LLVM_MAJOR}" cargo install --quiet --locked \
    "bpf-linker@${BPF_LINKER_VERSION}" --no-default-features --features "llvm-${LLVM_MAJOR}"
fi
