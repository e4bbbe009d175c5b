package main

// vhost-target rpc: a command-line JSON-RPC client for the target's
// management socket, in the manner of SPDK's rpc.py but with parameters
// given as key=value pairs rather than per-method flags, so that it needs no
// knowledge of the methods.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"vhost-target/config"
	"vhost-target/rpc"
)

// rpcTimeoutDefault is rpc.py's default timeout.
const rpcTimeoutDefault = 60 * time.Second

// rpcMain runs `vhost-target rpc`. It returns 0 with the result on stdout,
// 1 when the method failed or the target could not be reached, and 2 for a
// bad command line.
func rpcMain(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("vhost-target rpc", flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("s", "", "the target's JSON-RPC socket (default "+defaultRPCSocket()+")")
	cfgPath := fs.String("c", "", "take the socket from this configuration file's [rpc] socket")
	timeout := fs.Duration("t", rpcTimeoutDefault, "give up when no reply came within this time (0: never)")
	paramsJSON := fs.String("p", "", "the whole params, as a JSON object, instead of key=value pairs")
	fs.Usage = func() { rpcUsage(fs) }
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	fail := func(status int, format string, a ...any) int {
		fmt.Fprintf(stderr, "vhost-target rpc: "+format+"\n", a...)
		return status
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return 2
	}
	method := fs.Arg(0)
	pSet := false
	fs.Visit(func(f *flag.Flag) { pSet = pSet || f.Name == "p" })
	var params any // nil: no params member, as rpc.py sends for none
	if pSet {
		if fs.NArg() > 1 {
			return fail(2, "-p and key=value arguments cannot be combined")
		}
		raw, err := jsonParams(*paramsJSON)
		if err != nil {
			return fail(2, "-p: %v", err)
		}
		params = raw
	} else if fs.NArg() > 1 {
		raw, err := pairParams(fs.Args()[1:])
		if err != nil {
			return fail(2, "%v", err)
		}
		params = raw
	}
	path, err := rpcSocketPath(*socket, *cfgPath)
	if err != nil {
		return fail(2, "%v", err)
	}

	ctx := context.Background()
	if *timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *timeout)
		defer cancel()
	}
	c, err := rpc.DialContext(ctx, path)
	if err != nil {
		return fail(1, "cannot connect to %s: %s", path, connectError(err))
	}
	defer c.Close()
	var result json.RawMessage
	err = c.Call(ctx, method, params, &result)
	var rpcErr *rpc.Error
	switch {
	case errors.As(err, &rpcErr):
		return fail(1, "%s: %s (code %d)", method, rpcErr.Message, rpcErr.Code)
	case errors.Is(err, context.DeadlineExceeded):
		return fail(1, "%s: no reply from %s within %v", method, path, *timeout)
	case err != nil:
		cause := errors.Unwrap(err) // the client's "rpc: METHOD: " prefix off
		if cause == nil {
			cause = err
		}
		return fail(1, "%s: %s: %v", method, path, cause)
	}
	var out bytes.Buffer
	var text string
	if json.Unmarshal(result, &text) == nil {
		// A string result is printed as text, so that
		// "vhost-target rpc save_config > target.toml" writes the file.
		out.WriteString(text)
		if !strings.HasSuffix(text, "\n") {
			out.WriteByte('\n')
		}
		stdout.Write(out.Bytes())
		return 0
	}
	if err := json.Indent(&out, result, "", "  "); err != nil {
		return fail(1, "%s: result is not JSON: %v", method, err) // cannot happen: the client parsed it
	}
	out.WriteByte('\n')
	stdout.Write(out.Bytes())
	return 0
}

func rpcUsage(fs *flag.FlagSet) {
	w := fs.Output()
	fmt.Fprint(w, `Usage: vhost-target rpc [-s SOCKET | -c target.toml] [-t TIMEOUT] METHOD [key=value ...]
       vhost-target rpc [-s SOCKET | -c target.toml] [-t TIMEOUT] -p JSON METHOD

Calls METHOD of the running target over its JSON-RPC socket and prints the
result as JSON; a string result (a bdev name, save_config's TOML file) is
printed as text. The methods are SPDK's (bdev_malloc_create, bdev_get_bdevs,
vhost_create_scsi_controller, ...); "vhost-target rpc rpc_get_methods" lists
them. Flags come before METHOD.

Each key=value is a parameter. A value that is JSON (a number, true, false,
null, an array, an object or a "quoted string") is sent as that JSON value,
anything else as a string:

  vhost-target rpc bdev_malloc_create name=mem1 num_blocks=2048 block_size=512
  vhost-target rpc bdev_get_bdevs name='"123"'      # the string "123"
  vhost-target rpc -p '{"name":"mem1"}' bdev_get_bdevs

Exit status: 0 with the result on stdout; 1 when the method fails (its
message and code on stderr) or the target cannot be reached; 2 for a bad
command line.

Flags:
`)
	fs.PrintDefaults()
}

// defaultRPCSocket is where a target started without [rpc] socket listens.
func defaultRPCSocket() string {
	return filepath.Join(config.DefaultSocketDir(), config.RPCSocketName)
}

// rpcSocketPath picks the socket: -s, or -c's [rpc] socket, or the default.
func rpcSocketPath(socket, cfgPath string) (string, error) {
	switch {
	case socket != "" && cfgPath != "":
		return "", errors.New("-s and -c both name the socket: give one")
	case socket != "":
		return socket, nil
	case cfgPath != "":
		cfg, err := config.Load(cfgPath)
		if err != nil {
			return "", fmt.Errorf("-c: %w", err)
		}
		if cfg.RPC.Socket == "" {
			return "", fmt.Errorf("-c: %s sets [rpc] socket = \"\": that target serves no JSON-RPC", cfgPath)
		}
		return cfg.RPC.Socket, nil
	}
	return defaultRPCSocket(), nil
}

// pairParams builds a params object from key=value arguments, in their
// order. A value that is valid JSON is sent as that value (so numbers and
// booleans need no quoting), any other as a string.
func pairParams(pairs []string) (json.RawMessage, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	seen := make(map[string]bool, len(pairs))
	for i, p := range pairs {
		key, value, ok := strings.Cut(p, "=")
		if !ok || key == "" {
			return nil, fmt.Errorf("argument %q is not key=value", p)
		}
		if seen[key] {
			return nil, fmt.Errorf("parameter %q is given twice", key)
		}
		seen[key] = true
		if i > 0 {
			b.WriteByte(',')
		}
		k, _ := json.Marshal(key) // a string always encodes
		b.Write(k)
		b.WriteByte(':')
		if json.Valid([]byte(value)) {
			b.WriteString(value)
		} else {
			v, _ := json.Marshal(value)
			b.Write(v)
		}
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

// jsonParams checks -p's argument: a JSON object (or array, which JSON-RPC
// also allows as params).
func jsonParams(s string) (json.RawMessage, error) {
	raw := json.RawMessage(strings.TrimSpace(s))
	if !json.Valid(raw) {
		return nil, fmt.Errorf("%q is not valid JSON", s)
	}
	if raw[0] != '{' && raw[0] != '[' {
		return nil, fmt.Errorf("params must be a JSON object, not %s", raw)
	}
	return raw, nil
}

// connectError says why a connect failed, with what to check.
func connectError(err error) string {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		return err.Error()
	}
	switch errno {
	case syscall.ENOENT, syscall.ECONNREFUSED:
		return errno.Error() + " (is vhost-target running? -s or -c names another socket)"
	case syscall.EACCES, syscall.EPERM:
		return errno.Error() + " (the socket's [rpc] socket_mode, socket_owner and socket_group say who may connect)"
	}
	return errno.Error()
}
