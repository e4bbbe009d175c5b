package main

// The command line's first word picks what the binary does: the daemon
// (no subcommand: flags only, as before subcommands existed), rpc, bench,
// version or help.

import (
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
	"strings"
)

// version is the release this binary is, set at build time with
// -ldflags "-X main.version=v1.2.3". Empty means: take it from the build
// information Go records (module version, VCS revision).
var version string

// versionString is the binary's version without the program name: version
// when set, else the module version Go stamped from VCS (a pseudo-version,
// "+dirty" when built from a modified tree), else "devel-REVISION", else
// "devel".
func versionString() string {
	if version != "" {
		return version
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "devel"
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	var revision, modified string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			revision = s.Value
		case "vcs.modified":
			modified = s.Value
		}
	}
	if revision == "" {
		return "devel"
	}
	v := "devel-" + revision[:min(12, len(revision))]
	if modified == "true" {
		v += "-dirty"
	}
	return v
}

// dispatch runs the subcommand args name and returns the exit status.
func dispatch(args []string, stdout, stderr io.Writer) int {
	if wantsHelp(args) {
		usage(stdout)
		return 0
	}
	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		return run(args)
	}
	switch args[0] {
	case "rpc":
		return rpcMain(args[1:], stdout, stderr)
	case "bench":
		return benchMain(args[1:])
	case "version":
		fmt.Fprintf(stdout, "vhost-target %s (%s %s/%s)\n", versionString(), runtime.Version(), runtime.GOOS, runtime.GOARCH)
		return 0
	}
	// The daemon takes no arguments but flags, so a word here is a
	// mistyped subcommand; starting the daemon on it would surprise.
	fmt.Fprintf(stderr, "vhost-target: unknown subcommand %q (subcommands: rpc, bench, version, help)\n", args[0])
	return 2
}

// wantsHelp reports whether args ask for the top-level usage: "help", or
// -h, -help or --help anywhere among the daemon's flags. A subcommand's own
// -h is the subcommand's.
func wantsHelp(args []string) bool {
	if len(args) == 0 {
		return false
	}
	if args[0] == "help" {
		return true
	}
	if !strings.HasPrefix(args[0], "-") {
		return false // a subcommand
	}
	for _, a := range args {
		switch a {
		case "--":
			return false
		case "-h", "-help", "--help":
			return true
		}
	}
	return false
}

// usage lists the subcommands and the daemon's flags (those run defines;
// TestUsageListsDaemonFlags keeps the two lists equal).
func usage(w io.Writer) {
	fmt.Fprint(w, `vhost-target serves virtual disks to QEMU/KVM guests over vhost-user-scsi and vhost-user-blk.

Usage:
  vhost-target [-c target.toml] [-check] [-log-level LEVEL] [-cpuprofile FILE]
        run the target (without -c: one 256 MiB memory disk on controller vhost.0)
  vhost-target rpc [-s SOCKET | -c target.toml] [-t TIMEOUT] [-p JSON] METHOD [key=value ...]
        call a JSON-RPC method of the running target (SPDK's method names);
        vhost-target rpc rpc_get_methods lists them, vhost-target rpc -h says more
  vhost-target bench -socket PATH [-rw randread] [-bs 4096] [-qd 32] [-time 10s] ...
        drive a vhost-user-scsi (or, with -blk, vhost-user-blk) socket with the built-in front-end; vhost-target bench -h
  vhost-target version
        print the version
  vhost-target help
        print this

Flags of the target:
  -c FILE           configuration file (TOML); see deploy/README.md for its keys
  -check            validate the configuration and exit
  -log-level LEVEL  debug, info, warn or error (default info)
  -cpuprofile FILE  write a CPU profile (pprof) to FILE until shutdown
`)
}
