#!/usr/bin/env bash
# moat's full test run: installs what is missing, checks formatting and
# lints, runs every test (unit, BPF_PROG_TEST_RUN tables, the differential
# test against the reference model, live namespaces), the demo, and the
# benchmark in smoke mode. Needs root: the tests load XDP programs and
# create network namespaces. Run it as `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "test: must run as root (BPF programs, network namespaces)" >&2
  exit 1
fi

bash scripts/setup.sh

step() { printf '\n== %s ==\n' "$*"; }

step "format"
cargo fmt --all -- --check

step "clippy (host crates)"
cargo clippy --release --all-targets -- -D warnings

step "clippy (BPF crate, nightly, bpfel-unknown-none)"
cargo +nightly clippy --release -p moat-ebpf --target bpfel-unknown-none -Z build-std=core -- -D warnings

step "tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --release 2>&1 | tee "$log"

step "demo"
cargo run --release -p moat -- demo --requests 50

step "benchmarks (smoke: small counts, figures not asserted)"
cargo run --release -p moat-lab --bin moat-bench -- --quick
cargo run --release -p moat-lab --bin moat-apply-bench -- --quick
cargo build --release -p moat
cargo run --release -p moat-lab --bin moat-daemon-bench -- --quick
cargo run --release -p moat-lab --bin moat-failover-bench -- --quick
# The suite's smoke mode: every row once with tiny counts, so it cannot rot.
cargo build --release -p moat-lab --bins
target/release/moat-suite --smoke --out target/bench-smoke

# One closing line for the whole run.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "\ntests: %d passed, %d failed\n", p, f }' "$log"
