# vhost-target: build, run, test, bench.
GO      ?= go
BIN     := bin/vhost-target
PKGS    := ./...
# Unit and integration tests (the guest tests are in ./cmd/vhost-target, they
# need root, QEMU and a guest image that `make guest` builds and caches).
GOTEST_FLAGS ?= -count=1

.PHONY: all build run check test unit race guest fuzz-short fuzz bench vet fmt clean deps

all: build

build:
	$(GO) build -o $(BIN) ./cmd/vhost-target

# Run the target on the built-in default config (a 256 MiB memory disk on
# controller vhost.0); the log says where the socket and /metrics are.
run: build
	./$(BIN)

deps:
	$(GO) mod download

vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	$(GO) vet $(PKGS)

# Fast unit + integration tests with the race detector.
unit: deps
	$(GO) test $(GOTEST_FLAGS) -race -short $(PKGS)

# A short run of every fuzz target (seed corpora always run as part of unit).
fuzz-short:
	$(GO) test -run '^$$' -fuzz '^FuzzExecute$$' -fuzztime 10s -fuzzminimizetime 3s ./scsi
	$(GO) test -run '^$$' -fuzz '^FuzzPop$$' -fuzztime 10s -fuzzminimizetime 3s ./vhost/virtq
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime 10s -fuzzminimizetime 3s ./config
	$(GO) test -run '^$$' -fuzz '^FuzzProto$$' -fuzztime 10s -fuzzminimizetime 3s ./vhost/proto
	$(GO) test -run '^$$' -fuzz '^FuzzMessages$$' -fuzztime 10s -fuzzminimizetime 2s ./vhost
	$(GO) test -run '^$$' -fuzz '^FuzzRequest$$' -fuzztime 10s -fuzzminimizetime 2s ./vhost

fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzExecute$$' -fuzztime 5m -fuzzminimizetime 10s ./scsi
	$(GO) test -run '^$$' -fuzz '^FuzzPop$$' -fuzztime 5m -fuzzminimizetime 10s ./vhost/virtq
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime 5m -fuzzminimizetime 10s ./config
	$(GO) test -run '^$$' -fuzz '^FuzzProto$$' -fuzztime 5m -fuzzminimizetime 10s ./vhost/proto
	$(GO) test -run '^$$' -fuzz '^FuzzMessages$$' -fuzztime 5m -fuzzminimizetime 2s ./vhost
	$(GO) test -run '^$$' -fuzz '^FuzzRequest$$' -fuzztime 5m -fuzzminimizetime 2s ./vhost

# Real-guest tests: build (or reuse) the guest image, boot QEMU guests against
# the target. Needs root on Debian 12; installs QEMU and tools with apt-get.
guest: build
	$(GO) test $(GOTEST_FLAGS) -timeout 40m -v -run 'Guest' ./cmd/vhost-target/...

test: vet unit fuzz-short guest

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./scsi ./vhost/... ./reactor

clean:
	rm -rf bin
