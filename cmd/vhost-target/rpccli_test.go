package main

// Goal: `vhost-target rpc` turns its arguments into the request a user
// means, prints results and errors as documented, and exits 0, 1 or 2 as
// documented; the top-level dispatch lists the subcommands.
// Method: the CLI (rpcMain, dispatch) against an in-process rpc.Server with
// fake methods on a socket in a temporary directory; no target, no root.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"

	"vhost-target/rpc"
)

// cliServer serves fake methods on a fresh socket and returns its path.
func cliServer(t *testing.T) string {
	t.Helper()
	s := rpc.NewServer(rpc.Options{})
	s.Register("echo", func(ctx context.Context, params json.RawMessage) (any, error) {
		return map[string]json.RawMessage{"params": params}, nil
	})
	s.Register("fail", func(ctx context.Context, params json.RawMessage) (any, error) {
		return nil, rpc.Errnof(syscall.ENODEV, "bdev %q does not exist", "x")
	})
	s.Register("text", func(ctx context.Context, params json.RawMessage) (any, error) {
		return "socket_dir = \"/x\"\n[rpc]\n", nil
	})
	s.Register("name", func(ctx context.Context, params json.RawMessage) (any, error) {
		return "mem1", nil
	})
	s.Register("plain", func(ctx context.Context, params json.RawMessage) (any, error) {
		return nil, errors.New("boom")
	})
	s.Register("slow", func(ctx context.Context, params json.RawMessage) (any, error) {
		<-ctx.Done()
		return nil, ctx.Err()
	})
	path := filepath.Join(t.TempDir(), "rpc.sock")
	if err := s.Listen(path, 0o600, -1, -1); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return path
}

func runCLI(args ...string) (status int, stdout, stderr string) {
	var out, errOut bytes.Buffer
	status = dispatch(args, &out, &errOut)
	return status, out.String(), errOut.String()
}

func TestRPCCLI(t *testing.T) {
	sock := cliServer(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "target.toml")
	if err := os.WriteFile(cfg, []byte("[rpc]\nsocket = \""+sock+"\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	noRPC := filepath.Join(dir, "norpc.toml")
	if err := os.WriteFile(noRPC, []byte("[rpc]\nsocket = \"\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.sock")

	rows := []struct {
		name   string
		args   []string
		status int
		stdout string // exact, when status is 0
		stderr string // contained
	}{
		{name: "no params", args: []string{"-s", sock, "echo"}, stdout: "{\n  \"params\": null\n}\n"},
		{name: "pairs", args: []string{"-s", sock, "echo", "name=mem1", "num_blocks=2048", "block_size=512"},
			stdout: "{\n  \"params\": {\n    \"name\": \"mem1\",\n    \"num_blocks\": 2048,\n    \"block_size\": 512\n  }\n}\n"},
		{name: "JSON values", args: []string{"-s", sock, "echo", `q="123"`, "n=123", "b=true", "z=null", "a=[1, 2]", `o={"k":1}`, "f=-1.5e3"},
			stdout: "{\n  \"params\": {\n    \"q\": \"123\",\n    \"n\": 123,\n    \"b\": true,\n    \"z\": null,\n    \"a\": [\n      1,\n      2\n    ],\n    \"o\": {\n      \"k\": 1\n    },\n    \"f\": -1.5e3\n  }\n}\n"},
		{name: "strings", args: []string{"-s", sock, "echo", "e=", "s=hello world", "l=007", "eq=a=b", "t=True", "h=0x10"},
			stdout: "{\n  \"params\": {\n    \"e\": \"\",\n    \"s\": \"hello world\",\n    \"l\": \"007\",\n    \"eq\": \"a=b\",\n    \"t\": \"True\",\n    \"h\": \"0x10\"\n  }\n}\n"},
		{name: "-p", args: []string{"-s", sock, "-p", `{"name": "m0", "n": [1]}`, "echo"},
			stdout: "{\n  \"params\": {\n    \"name\": \"m0\",\n    \"n\": [\n      1\n    ]\n  }\n}\n"},
		{name: "-c", args: []string{"-c", cfg, "echo", "x=1"}, stdout: "{\n  \"params\": {\n    \"x\": 1\n  }\n}\n"},
		{name: "string result is text", args: []string{"-s", sock, "text"}, stdout: "socket_dir = \"/x\"\n[rpc]\n"},
		{name: "string result gets a newline", args: []string{"-s", sock, "name"}, stdout: "mem1\n"},
		{name: "-t 0", args: []string{"-s", sock, "-t", "0", "echo"}, stdout: "{\n  \"params\": null\n}\n"},

		{name: "errno error", args: []string{"-s", sock, "fail"}, status: 1, stderr: "vhost-target rpc: fail: bdev \"x\" does not exist (code -19)\n"},
		{name: "plain error", args: []string{"-s", sock, "plain"}, status: 1, stderr: "vhost-target rpc: plain: boom (code -32603)\n"},
		{name: "unknown method", args: []string{"-s", sock, "nope"}, status: 1, stderr: "(code -32601)"},
		{name: "timeout", args: []string{"-s", sock, "-t", "100ms", "slow"}, status: 1, stderr: "slow: no reply from " + sock + " within 100ms"},
		{name: "no socket", args: []string{"-s", missing, "echo"}, status: 1, stderr: "cannot connect to " + missing + ": no such file or directory (is vhost-target running?"},
		{name: "-c without rpc", args: []string{"-c", noRPC, "echo"}, status: 2, stderr: "serves no JSON-RPC"},
		{name: "-c missing file", args: []string{"-c", filepath.Join(dir, "none.toml"), "echo"}, status: 2, stderr: "none.toml"},

		{name: "repeated key", args: []string{"-s", sock, "echo", "a=1", "a=2"}, status: 2, stderr: `parameter "a" is given twice`},
		{name: "not a pair", args: []string{"-s", sock, "echo", "name"}, status: 2, stderr: `argument "name" is not key=value`},
		{name: "empty key", args: []string{"-s", sock, "echo", "=1"}, status: 2, stderr: `argument "=1" is not key=value`},
		{name: "flag after method", args: []string{"echo", "-s", sock}, status: 2, stderr: `argument "-s" is not key=value`},
		{name: "-p and pairs", args: []string{"-s", sock, "-p", "{}", "echo", "a=1"}, status: 2, stderr: "cannot be combined"},
		{name: "-p not JSON", args: []string{"-s", sock, "-p", "{a:1}", "echo"}, status: 2, stderr: "not valid JSON"},
		{name: "-p empty", args: []string{"-s", sock, "-p", "", "echo"}, status: 2, stderr: "not valid JSON"},
		{name: "-p scalar", args: []string{"-s", sock, "-p", "3", "echo"}, status: 2, stderr: "must be a JSON object"},
		{name: "-s and -c", args: []string{"-s", sock, "-c", cfg, "echo"}, status: 2, stderr: "give one"},
		{name: "no method", args: []string{"-s", sock}, status: 2, stderr: "Usage: vhost-target rpc"},
		{name: "bad flag", args: []string{"-x", "echo"}, status: 2, stderr: "flag provided but not defined: -x"},
		{name: "-h", args: []string{"-h"}, status: 0, stderr: "key=value"},
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			status, stdout, stderr := runCLI(append([]string{"rpc"}, row.args...)...)
			if status != row.status {
				t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", status, row.status, stdout, stderr)
			}
			if row.status == 0 && row.stdout != "" && stdout != row.stdout {
				t.Errorf("stdout %q, want %q", stdout, row.stdout)
			}
			if row.status != 0 && stdout != "" {
				t.Errorf("stdout %q on failure", stdout)
			}
			if !strings.Contains(stderr, row.stderr) {
				t.Errorf("stderr %q, want it to contain %q", stderr, row.stderr)
			}
		})
	}
}

func TestSubcommands(t *testing.T) {
	for _, args := range [][]string{{"help"}, {"-h"}, {"--help"}, {"-help"}, {"-c", "x.toml", "-h"}} {
		status, stdout, _ := runCLI(args...)
		if status != 0 {
			t.Errorf("%q: exit %d", args, status)
		}
		for _, want := range []string{"vhost-target rpc ", "vhost-target bench ", "vhost-target version", "-c FILE", "-log-level"} {
			if !strings.Contains(stdout, want) {
				t.Errorf("%q: usage lacks %q:\n%s", args, want, stdout)
			}
		}
	}
	status, stdout, _ := runCLI("version")
	if status != 0 || !regexp.MustCompile(`^vhost-target \S+ \(go\S+ \S+/\S+\)\n$`).MatchString(stdout) {
		t.Errorf("version: exit %d, %q", status, stdout)
	}
	version = "v9.9.9"
	defer func() { version = "" }()
	if _, stdout, _ := runCLI("version"); !strings.HasPrefix(stdout, "vhost-target v9.9.9 (") {
		t.Errorf("version with -X main.version: %q", stdout)
	}
	status, _, stderr := runCLI("rcp", "bdev_get_bdevs")
	if status != 2 || !strings.Contains(stderr, `unknown subcommand "rcp"`) {
		t.Errorf("mistyped subcommand: exit %d, %q", status, stderr)
	}
	// bench keeps its own flags and usage.
	if status, _, _ := runCLI("bench"); status != 2 {
		t.Errorf("bench without -socket: exit %d", status)
	}
}

// TestUsageListsDaemonFlags keeps usage's list of the target's flags equal
// to those run defines: run -h prints run's flags (to stderr).
func TestUsageListsDaemonFlags(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	saved := os.Stderr
	os.Stderr = w
	status := run([]string{"-h"})
	os.Stderr = saved
	w.Close()
	printed, _ := io.ReadAll(r)
	if status != 2 {
		t.Fatalf("run -h: exit %d", status)
	}
	var help bytes.Buffer
	usage(&help)
	flags := regexp.MustCompile(`(?m)^  -(\S+)`).FindAllStringSubmatch(string(printed), -1)
	if len(flags) == 0 {
		t.Fatalf("no flags in run -h output:\n%s", printed)
	}
	for _, f := range flags {
		if !regexp.MustCompile(`(?m)^  -` + regexp.QuoteMeta(f[1]) + ` `).MatchString(help.String()) {
			t.Errorf("usage does not list the target's flag -%s", f[1])
		}
	}
}
