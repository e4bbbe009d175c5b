// Command vhost-target serves virtual disks to QEMU/KVM guests over
// vhost-user-scsi and vhost-user-blk.
//
//	vhost-target [-c target.toml] [--check] [-log-level info]
//
// With no -c it starts on a built-in default: one 256 MiB memory disk on
// controller vhost.0. See deploy/README.md for the configuration keys.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"vhost-target/bdev"
	"vhost-target/bdev/aio"
	"vhost-target/bdev/errbdev"
	"vhost-target/bdev/file"
	"vhost-target/bdev/malloc"
	"vhost-target/bdev/rbd"
	"vhost-target/config"
	"vhost-target/reactor"
	"vhost-target/vhost"
)

func main() {
	os.Exit(dispatch(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string) int {
	fs := flag.NewFlagSet("vhost-target", flag.ContinueOnError)
	cfgPath := fs.String("c", "", "configuration file (TOML); without it a built-in default is used")
	check := fs.Bool("check", false, "validate the configuration and exit")
	level := fs.String("log-level", "info", "log level: debug, info, warn, error")
	cpuprofile := fs.String("cpuprofile", "", "write a CPU profile (pprof) to this file until shutdown")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(*level)); err != nil {
		fmt.Fprintf(os.Stderr, "vhost-target: -log-level: %v\n", err)
		return 2
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lv}))
	slog.SetDefault(log)

	var cfg *config.Config
	if *cfgPath == "" {
		cfg = config.Default()
		log.Info("no -c given: using the built-in default configuration")
	} else {
		var err error
		if cfg, err = config.Load(*cfgPath); err != nil {
			fmt.Fprintf(os.Stderr, "vhost-target: invalid configuration:\n%v\n", err)
			return 1
		}
	}
	if err := checkBuilt(cfg, srcName(*cfgPath)); err != nil {
		// --check says so too: a file this binary cannot start is not valid here.
		fmt.Fprintf(os.Stderr, "vhost-target: %v\n", err)
		return 1
	}
	if *check {
		fmt.Printf("%s: configuration is valid (%d bdevs, %d controllers)\n", srcName(*cfgPath), len(cfg.Bdevs), len(cfg.Controllers))
		return 0
	}
	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err != nil {
			fmt.Fprintf(os.Stderr, "vhost-target: -cpuprofile: %v\n", err)
			return 1
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintf(os.Stderr, "vhost-target: -cpuprofile: %v\n", err)
			return 1
		}
		defer func() { pprof.StopCPUProfile(); f.Close() }()
	}
	t, err := start(cfg, log)
	if err != nil {
		fmt.Fprintf(os.Stderr, "vhost-target: %v\n", err)
		return 1
	}
	t.cfgPath = *cfgPath
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGUSR1)
	for s := range sig {
		if s == syscall.SIGUSR1 {
			// Every running request queue's state, for a guest whose I/O
			// stands still (also vhost_get_queue_states).
			for _, c := range t.controllers() {
				for _, st := range c.QueueStates() {
					log.Info("queue state", "controller", c.Name(), "session", st.Session, "vring", st.Vring,
						"in_flight", st.InFlight, "state", fmt.Sprintf("%+v", st.Ring), "broken", st.Broken, "stopping", st.Stopping)
				}
			}
			continue
		}
		if s == syscall.SIGHUP {
			// Re-read the file and apply the difference; a bad file changes
			// nothing and the target keeps serving.
			if _, err := t.reload("SIGHUP"); err != nil {
				log.Error("reload refused", "file", t.cfgPath, "err", err)
			}
			continue
		}
		log.Info("signal received: draining in-flight I/O and shutting down", "signal", s.String())
		break
	}
	t.stop()
	log.Info("stopped")
	return 0
}

func srcName(p string) string {
	if p == "" {
		return "built-in default"
	}
	return p
}

// target is a running vhost-target. Reactors are fixed at start; bdevs and
// controllers change at runtime (manage.go), under mu.
type target struct {
	log      *slog.Logger
	reactors []*reactor.Reactor
	byCPU    map[int]*reactor.Reactor

	// cfgPath is the file reload reads ("" = started on the built-in default).
	cfgPath string

	mu    sync.Mutex     // serialises management changes (RPC, reload, stop)
	cfg   *config.Config // the running configuration: what save_config writes
	bdevs map[string]bdev.Bdev
	ctrls map[string]*vhost.Controller
	// view is the controller list for /metrics, replaced on every change.
	view atomic.Pointer[[]*vhost.Controller]

	metrics     *http.Server
	metricsAddr string // host:port the metrics endpoint listens on
	rpc         rpcServer
}

// start brings up reactors, then opens the bdevs and controllers of cfg one
// by one through the same code the runtime API uses.
func start(cfg *config.Config, log *slog.Logger) (t *target, err error) {
	// The running configuration starts without bdevs and controllers; each
	// is added as the API would add it.
	base := cfg.Clone()
	base.Bdevs, base.Controllers = nil, nil
	t = &target{log: log, cfg: base, byCPU: map[int]*reactor.Reactor{},
		bdevs: map[string]bdev.Bdev{}, ctrls: map[string]*vhost.Controller{}}
	t.publishControllers()
	defer func() {
		if err != nil {
			t.stop()
			t = nil
		}
	}()
	// Each reactor owns a P while it spins; leave room for the control plane,
	// the metrics server and the garbage collector.
	if want := len(cfg.Reactors.CPUs) + 2; runtime.GOMAXPROCS(0) < want {
		runtime.GOMAXPROCS(want)
	}
	mode := reactor.Busy
	if cfg.Reactors.Poll == config.PollAdaptive {
		mode = reactor.Adaptive
	}
	for i, cpu := range cfg.Reactors.CPUs {
		r, err := reactor.New(i, cpu, mode)
		if err != nil {
			return t, err
		}
		if err := r.Start(); err != nil {
			return t, err
		}
		t.reactors = append(t.reactors, r)
		t.byCPU[cpu] = r
	}
	if err := os.MkdirAll(cfg.SocketDir, 0o755); err != nil {
		return t, fmt.Errorf("socket_dir: %w", err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, b := range cfg.Bdevs {
		if err := t.addBdevLocked(b, cfg.Source()); err != nil {
			return t, err
		}
	}
	for _, cc := range cfg.Controllers {
		if err := t.addControllerLocked(cc, cfg.Source()); err != nil {
			return t, err
		}
	}
	if cfg.Metrics.Listen != "" {
		ln, err := net.Listen("tcp", cfg.Metrics.Listen)
		if err != nil {
			return t, fmt.Errorf("metrics.listen: %w", err)
		}
		t.metrics = &http.Server{Handler: metricsHandler(t), ReadHeaderTimeout: 10 * time.Second}
		t.metricsAddr = ln.Addr().String()
		if a, ok := ln.Addr().(*net.TCPAddr); ok && !a.IP.IsLoopback() {
			// /metrics has no authentication and names every controller and bdev.
			log.Warn("metrics endpoint listens beyond loopback: anyone who can reach it reads the target's layout and load",
				"listen", t.metricsAddr)
		}
		go t.metrics.Serve(ln)
		log.Info("metrics listening", "url", "http://"+ln.Addr().String()+"/metrics")
	}
	if err := t.startRPC(cfg); err != nil {
		return t, err
	}
	log.Info("vhost-target ready", "reactors", fmt.Sprint(cfg.Reactors.CPUs), "poll", cfg.Reactors.Poll,
		"bdev_types", strings.Join(bdevTypes(), ","))
	return t, nil
}

// newController creates and starts the controller cc of configuration c.
func (t *target) newController(c *config.Config, cc *config.Controller) (*vhost.Controller, error) {
	vc := vhost.Config{
		Name: cc.Name, SocketPath: c.SocketPath(cc), SocketMode: os.FileMode(cc.SocketMode),
		NumQueues: cc.NumQueues, MaxSessions: cc.MaxSessions, Migration: cc.Migration, Logger: t.log,
	}
	var err error
	vc.SocketUID, vc.SocketGID, err = cc.SocketIDs()
	if err != nil {
		return nil, fmt.Errorf("controller %q: %w", cc.Name, err)
	}
	for _, cpu := range cc.CPUs {
		vc.Reactors = append(vc.Reactors, t.byCPU[cpu])
	}
	disk := []any{"luns", len(cc.LUNs)}
	if cc.Type == config.ControllerBlk {
		vc.Kind, vc.Disk, vc.ReadOnly = vhost.KindBlk, t.bdevs[cc.Bdev], cc.ReadOnly
		disk = []any{"bdev", cc.Bdev, "read_only", cc.ReadOnly}
	}
	for _, l := range cc.LUNs {
		vc.LUNs = append(vc.LUNs, vhost.LUNSpec{Target: l.Target, LUN: l.LUN, Bdev: t.bdevs[l.Bdev]})
	}
	ctrl, err := vhost.NewController(vc)
	if err != nil {
		return nil, err
	}
	if err := ctrl.Listen(); err != nil {
		return nil, err
	}
	attrs := append([]any{"controller", cc.Name, "type", cc.Type, "socket", vc.SocketPath}, disk...)
	t.log.Info("controller listening", append(attrs, "num_queues", cc.NumQueues, "max_sessions", cc.MaxSessions,
		"migration", cc.Migration, "cpus", fmt.Sprint(cc.CPUs))...)
	return ctrl, nil
}

// openBdev opens one configured bdev; opened holds those opened before it
// (an error bdev's base is defined earlier, config checks that).
func openBdev(b *config.Bdev, opened map[string]bdev.Bdev, log *slog.Logger) (bdev.Bdev, error) {
	switch b.Type {
	case config.TypeMalloc:
		// Allocates and populates all of the disk now; logs the backing it got.
		return malloc.Create(malloc.Config{Name: b.Name, Size: b.Size, BlockSize: b.BlockSize, UUID: b.UUID,
			Hugepages: b.Hugepages, Logger: log})
	case config.TypeFile:
		return file.New(file.Config{Name: b.Name, Path: b.Path, Size: b.Size, BlockSize: b.BlockSize, Create: b.Create,
			ReadOnly: b.ReadOnly, Workers: b.Workers, QueueDepth: b.QueueDepth, UUID: b.UUID})
	case config.TypeAIO:
		d, err := aio.New(aio.Config{Name: b.Name, Path: b.Path, Size: b.Size, BlockSize: b.BlockSize, Create: b.Create,
			ReadOnly: b.ReadOnly, Engine: b.Engine, QueueDepth: b.QueueDepth, UUID: b.UUID, Logger: log})
		if err == nil {
			log.Info("aio bdev engine", "bdev", b.Name, "engine", d.Engine())
		}
		return d, err
	case config.TypeError:
		return openErrorBdev(b, opened[b.Base])
	case config.TypeRBD:
		// In a binary built without the rbd tag this fails with
		// rbd.ErrNotBuilt, naming the bdev.
		c := rbd.Config{Name: b.Name, Pool: b.Pool, Image: b.Image, Namespace: b.Namespace, Conf: b.Conf,
			User: b.User, Keyring: b.Keyring, BlockSize: b.BlockSize, QueueDepth: b.QueueDepth, ReadOnly: b.ReadOnly,
			UUID: b.UUID, OpTimeout: b.OpTimeout, Logger: log}
		if b.OpTimeout == 0 {
			c.OpTimeout = -1 // op_timeout = "0s": wait for ever (rbd's 0 is its default)
		}
		d, err := rbd.Open(c)
		if err != nil {
			return nil, err
		}
		info := d.Info()
		log.Info("rbd bdev opened", "bdev", b.Name, "pool", b.Pool, "namespace", b.Namespace, "image", b.Image,
			"size", info.NumBlocks*uint64(info.BlockSize), "read_only", b.ReadOnly)
		return d, nil
	}
	return nil, fmt.Errorf("bdev %q: type %q is not available in this build", b.Name, b.Type)
}

// bdevTypes lists the bdev types this binary can open: rbd only when it
// was built with the rbd tag (and so links librbd).
func bdevTypes() []string {
	types := []string{config.TypeMalloc, config.TypeFile, config.TypeAIO, config.TypeError}
	if rbd.Available() {
		types = append(types, config.TypeRBD)
	}
	return types
}

// checkBuilt refuses a configuration with bdevs of a type this binary
// cannot open (rbd without the rbd build tag), naming each one; the config
// package accepts every type in every build.
func checkBuilt(cfg *config.Config, source string) error {
	var errs []error
	for i := range cfg.Bdevs {
		b := &cfg.Bdevs[i]
		if !slices.Contains(bdevTypes(), b.Type) {
			err := fmt.Errorf("type %q is not available in this build", b.Type)
			if b.Type == config.TypeRBD {
				err = rbd.ErrNotBuilt
			}
			errs = append(errs, fmt.Errorf("%s: bdev[%d] %q: %w", source, i, b.Name, err))
		}
	}
	return errors.Join(errs...)
}

func openErrorBdev(b *config.Bdev, base bdev.Bdev) (bdev.Bdev, error) {
	rules := make([]errbdev.Rule, len(b.Inject))
	for i, in := range b.Inject {
		op, ok := errbdev.ParseOp(in.Op)
		if !ok {
			return nil, fmt.Errorf("bdev %q: inject[%d]: unknown op %q", b.Name, i, in.Op)
		}
		rules[i] = errbdev.Rule{Op: op, LBAStart: in.LBAStart, LBACount: in.LBACount, Delay: in.Delay, Count: in.Count}
		if in.Error == config.InjectEIO {
			rules[i].Err = bdev.ErrIO
		}
	}
	return errbdev.New(errbdev.Config{Name: b.Name, Base: base, Rules: rules, UUID: b.UUID})
}

// stop closes the RPC server, then controllers (each drains its in-flight
// I/O before closing its connections), then reactors, then bdevs (error
// bdevs before the bdevs they wrap).
func (t *target) stop() {
	t.stopRPC()
	if t.metrics != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		t.metrics.Shutdown(ctx)
		cancel()
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for i := len(t.cfg.Controllers) - 1; i >= 0; i-- {
		name := t.cfg.Controllers[i].Name
		if c := t.ctrls[name]; c != nil {
			if err := c.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
				t.log.Warn("closing controller", "controller", name, "err", err)
			}
			delete(t.ctrls, name)
		}
	}
	t.publishControllers()
	for _, r := range t.reactors {
		r.Stop()
	}
	for i := len(t.cfg.Bdevs) - 1; i >= 0; i-- {
		name := t.cfg.Bdevs[i].Name
		if b := t.bdevs[name]; b != nil {
			b.Close()
			delete(t.bdevs, name)
		}
	}
}
