# moat: the two commands of the quick start, plus the benchmark.
# All targets need root (XDP programs, network namespaces).

.PHONY: demo test bench bench-detail setup

setup:
	bash scripts/setup.sh

demo: setup
	cargo run --release -p moat -- demo

test:
	bash scripts/test.sh

# The benchmark suite: moat beside xdp-filter, nftables, iptables and the
# kernel's forwarding path; writes target/bench/BENCHMARKS.md and plots.
bench: setup
	cargo build --release -p moat -p moat-lab --bins
	target/release/moat-suite --out target/bench

# The per-feature benchmarks (data-plane paths, apply times, daemon, failover).
bench-detail: setup
	cargo build --release -p moat -p moat-lab --bins
	target/release/moat-bench
	target/release/moat-apply-bench
	target/release/moat-daemon-bench
	target/release/moat-failover-bench
