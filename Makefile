# lazypull: the two set-up commands are `make demo` and `make test`.
CARGO ?= cargo

.PHONY: build deps test demo bench bench-coldstart bench-quick lint clean

build:
	$(CARGO) build --release --workspace

## Install (apt-get) the Debian packages the tests and benchmarks drive; skips what is present.
deps:
	bash scripts/install-deps.sh

## Run every test: unit, property and integration tests against a real registry
## (docker-registry from Debian must be installed; .ci/run installs it).
test: deps
	$(CARGO) test --workspace --locked -- --test-threads=4

## Lint as CI does.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

## Benchmarks, each printing ratios measured in the same run: fetcher throughput and cache
## latency (against curl), then the filesystem (cold start, warm reads, metadata walk, memory)
## through the release `lazypull` binary, then `lazypull run` to the container's first output
## line against a full pull (skopeo copy + umoci unpack + runc run).
bench: deps
	$(CARGO) run --release -p lazypull-benches --bin fetch-bench
	$(CARGO) build --release -p lazypull
	$(CARGO) run --release -p lazypull-benches --bin fs-bench
	$(CARGO) run --release -p lazypull-benches --bin run-bench
	$(CARGO) run --release -p lazypull-benches --bin coldstart

## Cold start over a shaped link (default: profile wan, every workload, 5 runs): containerd and
## podman full pulls against lazypull's modes; writes target/bench/coldstart.{md,svg}.
## Arguments go through ARGS, e.g. `make bench-coldstart ARGS="--profile all --runs 3"`.
bench-coldstart: deps
	$(CARGO) build --release -p lazypull
	$(CARGO) run --release -p lazypull-benches --bin coldstart -- $(ARGS)

## The CI smoke run of the cold-start benchmark: one workload, one profile, one run.
bench-quick: deps
	$(CARGO) build --release -p lazypull
	$(CARGO) run --release -p lazypull-benches --bin coldstart -- --quick

## Demo: installs what is missing (apt-get), builds, then starts a container from a ~430 MB
## image with `lazypull run` and with a full pull, and compares the time to its first output line.
demo:
	./scripts/demo.sh

clean:
	$(CARGO) clean
