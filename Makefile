# moat: the two commands of the quick start, plus the benchmark.
# All targets need root (XDP programs, network namespaces).

.PHONY: demo test bench setup

setup:
	bash scripts/setup.sh

demo: setup
	cargo run --release -p moat -- demo

test:
	bash scripts/test.sh

bench: setup
	cargo run --release -p moat-lab --bin moat-bench
	cargo run --release -p moat-lab --bin moat-apply-bench
	cargo build --release -p moat
	cargo run --release -p moat-lab --bin moat-daemon-bench
	cargo run --release -p moat-lab --bin moat-failover-bench
