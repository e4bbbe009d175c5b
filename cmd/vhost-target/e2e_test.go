package main

// Real-guest end-to-end tests: the target runs in-process and a QEMU 7.2
// guest (package guest) drives it the way a VM does, SeaBIOS first, then
// Linux's virtio_scsi/sd/sg, sg3_utils and fio. Every test name starts with
// TestGuest so `go test -run Guest` (make guest) selects them; -short skips
// them. This file holds the shared helpers; the checks live in e2e_*_test.go.

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"vhost-target/cmd/vhost-target/guest"
	"vhost-target/config"
	"vhost-target/vhost"
)

// guestImage builds (or reuses) the guest image; real-guest tests skip in -short mode.
func guestImage(t *testing.T) *guest.Image {
	t.Helper()
	if testing.Short() {
		t.Skip("real-guest test: skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	img, err := guest.Build(ctx, t.Logf)
	if errors.Is(err, guest.ErrNeedRoot) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// e2eTarget is an in-process target under test.
type e2eTarget struct {
	*target
	cfg  *config.Config
	logs *logBuffer
	once sync.Once
}

// Stop drains and stops the target; it is safe to call more than once (the
// test's cleanup calls it too).
func (e *e2eTarget) Stop() { e.once.Do(e.target.stop) }

// sock returns the socket path of the named controller.
func (e *e2eTarget) sock(name string) string {
	for i := range e.cfg.Controllers {
		if e.cfg.Controllers[i].Name == name {
			return e.cfg.SocketPath(&e.cfg.Controllers[i])
		}
	}
	panic("no controller " + name)
}

// ctrl returns the named controller.
func (e *e2eTarget) ctrl(name string) *vhost.Controller {
	for _, c := range e.controllers() {
		if c.Name() == name {
			return c
		}
	}
	panic("no controller " + name)
}

// targetOpts tune startTargetWith.
type targetOpts struct {
	dir   string     // socket_dir; "" makes a fresh one under /tmp
	level slog.Level // log level (default info)
	// hook sees every log record with its attributes flattened (handler
	// attributes such as controller=c0 included), on the logging goroutine.
	hook func(msg string, attrs map[string]string)
}

// startTarget runs the target in-process on cfg text (socket_dir is filled in).
func startTarget(t *testing.T, text string) *e2eTarget {
	t.Helper()
	return startTargetWith(t, text, targetOpts{})
}

// shortTempDir makes a directory under /tmp, removed when the test ends:
// t.TempDir's paths can be too long for a unix socket's 108 bytes.
func shortTempDir(t *testing.T, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func startTargetWith(t *testing.T, text string, o targetOpts) *e2eTarget {
	t.Helper()
	dir := o.dir
	if dir == "" {
		dir = shortTempDir(t, "vt-e2e-")
	}
	cfg, err := config.Parse([]byte(fmt.Sprintf("socket_dir = %q\n", dir)+text), t.Name())
	if err != nil {
		t.Fatal(err)
	}
	logs := &logBuffer{}
	var h slog.Handler = slog.NewTextHandler(io.MultiWriter(logs, testWriter{t}), &slog.HandlerOptions{Level: o.level})
	if o.hook != nil {
		h = &hookHandler{Handler: h, hook: o.hook}
	}
	tg, err := start(cfg, slog.New(h))
	if err != nil {
		t.Fatal(err)
	}
	e := &e2eTarget{target: tg, cfg: cfg, logs: logs}
	t.Cleanup(e.Stop)
	return e
}

// logBuffer collects the target's log for assertions; slog writes from
// several goroutines.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// hookHandler passes each record to hook before the wrapped handler.
type hookHandler struct {
	slog.Handler
	attrs []slog.Attr
	hook  func(msg string, attrs map[string]string)
}

func (h *hookHandler) Handle(ctx context.Context, r slog.Record) error {
	m := make(map[string]string, len(h.attrs)+r.NumAttrs())
	for _, a := range h.attrs {
		m[a.Key] = a.Value.String()
	}
	r.Attrs(func(a slog.Attr) bool { m[a.Key] = a.Value.String(); return true })
	h.hook(r.Message, m)
	return h.Handler.Handle(ctx, r)
}

func (h *hookHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &hookHandler{Handler: h.Handler.WithAttrs(as), attrs: append(append([]slog.Attr(nil), h.attrs...), as...), hook: h.hook}
}

func (h *hookHandler) WithGroup(name string) slog.Handler {
	return &hookHandler{Handler: h.Handler.WithGroup(name), attrs: h.attrs, hook: h.hook}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// runGuest boots a guest with the controllers' sockets and fails the test on
// a non-zero script status or a harness error, printing the console.
func runGuest(t *testing.T, img *guest.Image, o guest.Options) *guest.Result {
	t.Helper()
	o.Image = img
	if o.Timeout == 0 {
		o.Timeout = 4 * time.Minute
	}
	res, err := guest.Run(context.Background(), o)
	if err != nil {
		console := ""
		if res != nil {
			console = res.Console
		}
		t.Fatalf("guest: %v\nconsole:\n%s", err, console)
	}
	if res.ExitCode != 0 {
		t.Fatalf("guest script exited %d; console:\n%s", res.ExitCode, res.Console)
	}
	t.Logf("guest ran in %v", res.Duration.Round(time.Millisecond))
	return res
}

// shPrelude starts every guest script: stop at the first failing command
// (the exit status fails the test and prints the console) and mark output
// sections for sections().
// targetPrelude begins most guest tests' configs: no metrics listener and
// one adaptive reactor on CPU 0, which leaves the other core to the TCG guest.
const targetPrelude = `
[metrics]
listen = ""
[reactors]
cpus = [0]
poll = "adaptive"
`

const shPrelude = `set -e
sec() { echo "@@@ $*"; }
`

var printkLine = regexp.MustCompile(`^\[\s*\d+\.\d+\] `)

// sections splits a console at the script's `sec NAME` markers: the result
// maps each NAME to the lines printed after it (kernel messages dropped,
// carriage returns removed) up to the next marker or the GUEST-RESULT line.
func sections(console string) map[string]string {
	out := map[string]string{}
	name := ""
	var cur []string
	flush := func() {
		if name != "" {
			out[name] = strings.Join(cur, "\n")
		}
		cur = nil
	}
	for _, l := range strings.Split(console, "\n") {
		l = strings.TrimRight(l, "\r")
		switch {
		case strings.HasPrefix(l, "@@@ "):
			flush()
			name = strings.TrimPrefix(l, "@@@ ")
		case strings.HasPrefix(l, "GUEST-RESULT "):
			flush()
			name = ""
		case name != "" && !printkLine.MatchString(l):
			cur = append(cur, l)
		}
	}
	flush()
	return out
}

// section returns one section and fails the test if the script did not print it.
func section(t *testing.T, secs map[string]string, name string) string {
	t.Helper()
	s, ok := secs[name]
	if !ok {
		t.Fatalf("guest printed no section %q", name)
	}
	return s
}

// wantMatch fails unless text matches every pattern (multi-line mode).
func wantMatch(t *testing.T, what, text string, patterns ...string) {
	t.Helper()
	for _, p := range patterns {
		if !regexp.MustCompile("(?m)" + p).MatchString(text) {
			t.Errorf("%s: no match for %q in:\n%s", what, p, text)
		}
	}
}

// serialOf is the unit serial number the target derives from a bdev's
// default UUID (config.BdevUUID): the UUID in lower-case hex.
func serialOf(bdevName string) string {
	u := config.BdevUUID(bdevName)
	return hex.EncodeToString(u[:])
}

// naaOf is the NAA 6 designator sg_vpd prints for a bdev: 0x6 followed by
// the first 124 bits of the UUID.
func naaOf(bdevName string) string {
	return "0x6" + serialOf(bdevName)[:31]
}

// waitFor polls cond every 50 ms until it holds or d passes.
func waitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}
