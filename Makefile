# vhost-target: build, run, test, bench.
GO      ?= go
BIN     := bin/vhost-target
PKGS    := ./...
# Unit and integration tests (the guest tests are in ./cmd/vhost-target, they
# need root, QEMU and a guest image that `make guest` builds and caches).
GOTEST_FLAGS ?= -count=1

.PHONY: all build run check test unit race guest fuzz-short fuzz bench vet fmt clean deps rbd rbd-deps

# The rbd bdev (Ceph RBD through librbd, cgo) is built with the build tag rbd
# when librbd's headers are installed (Debian: librbd-dev); without them, and
# with a plain `go build`, the binary is pure Go and has no rbd bdev.
RBD_HEADER := /usr/include/rbd/librbd.h
TAGS ?= $(if $(wildcard $(RBD_HEADER)),rbd,)

all: build

# The version `vhost-target version` and spdk_get_version report.
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo devel)

build:
	$(GO) build -tags "$(TAGS)" -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/vhost-target

# Run the target on the built-in default config (a 256 MiB memory disk on
# controller vhost.0); the log says where the socket and /metrics are.
run: build
	./$(BIN)

deps:
	$(GO) mod download

vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	$(GO) vet -tags "$(TAGS)" $(PKGS)

# Fast unit + integration tests with the race detector.
unit: deps
	$(GO) test $(GOTEST_FLAGS) -tags "$(TAGS)" -race -short $(PKGS)

# librbd's headers for the rbd bdev (make test installs them).
# librbd-dev to build; ceph-mon, ceph-osd and ceph-common for the tests'
# one-host cluster, installed here once rather than by test packages running
# in parallel (cephtest.Install still installs them for a lone go test).
RBD_PKGS := librbd-dev ceph-mon ceph-osd ceph-common
rbd-deps:
	@missing=; for p in $(RBD_PKGS); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; [ -z "$$missing" ] || { echo "rbd-deps: installing$$missing"; \
		apt-get -o DPkg::Lock::Timeout=600 update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
		--no-install-recommends $$missing; }

# The rbd bdev on a one-host Ceph cluster the tests start (root; they install
# ceph-mon, ceph-osd and ceph-common when missing): the bdev's own tests and
# the daemon's rbd config and RPC tests. The rbd guest tests are in `guest`.
rbd: rbd-deps
	$(GO) test $(GOTEST_FLAGS) -tags rbd -timeout 20m ./bdev/rbd/...
	$(GO) test $(GOTEST_FLAGS) -tags rbd -timeout 20m -run 'RBD' -skip 'Guest' ./cmd/vhost-target/

# Every fuzz target as Name:package. Their seed corpora also run in `unit`.
FUZZ_TARGETS := FuzzExecute:./scsi FuzzPop:./vhost/virtq FuzzParse:./config FuzzProto:./vhost/proto \
	FuzzMessages:./vhost FuzzRequest:./vhost FuzzServer:./rpc FuzzPrepare:./vhost/blk \
	FuzzBlkRequest:./vhost

# fuzz-run TIME: fuzz each target for TIME (minimization bounded so a new
# input cannot stall a short run). Go 1.26's fuzz coordinator can fail a
# duration-bounded run with a bare "context deadline exceeded" at the
# -fuzztime boundary on a loaded machine (go.dev/issue/75804, fixed in Go
# 1.27): such a run, which wrote no failing input, is reported and passed;
# any other failure fails the target.
define fuzz-run
	@set -e; for t in $(FUZZ_TARGETS); do \
		echo "fuzz $${t%%:*} for $(1)"; \
		out=$$(mktemp); rc=0; \
		$(GO) test -run '^$$' -fuzz "^$${t%%:*}$$" -fuzztime $(1) -fuzzminimizetime 2s "$${t#*:}" >$$out 2>&1 || rc=$$?; \
		cat $$out; \
		if [ $$rc -ne 0 ]; then \
			if grep -q 'context deadline exceeded' $$out && ! grep -q 'Failing input written' $$out; then \
				echo "fuzz $${t%%:*}: go.dev/issue/75804 (coordinator deadline race, no failing input): not a failure"; \
			else rm -f $$out; exit 1; fi; \
		fi; \
		rm -f $$out; \
	done
endef

# A short run of every fuzz target (part of `make test`).
fuzz-short:
	$(call fuzz-run,10s)

fuzz:
	$(call fuzz-run,5m)

# Real-guest tests: build (or reuse) the guest image, boot QEMU guests against
# the target. Needs root on Debian 12; installs QEMU and tools with apt-get.
guest: build
	$(GO) test $(GOTEST_FLAGS) -tags "$(TAGS)" -timeout 50m -v -run 'Guest' ./cmd/vhost-target/...

# Everything, the rbd bdev included (its headers are installed first, so the
# build tag is on whatever the machine had).
test: rbd-deps
	$(MAKE) TAGS=rbd vet unit fuzz-short rbd guest

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./scsi ./vhost/... ./reactor

clean:
	rm -rf bin
