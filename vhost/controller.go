// Package vhost serves vhost-user-scsi controllers: one unix socket each, a
// session per connected front-end (QEMU or any vhost-user VMM), and the
// virtio-scsi request path that runs on reactors.
//
// The control plane (message parsing, memory tables, ring setup) runs on one
// goroutine per connection. A request queue, once started, is owned by one
// reactor: every later change to it (call fd swap, stop, drain) is a message
// to that reactor, so the data path needs no locks.
package vhost

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"

	"vhost-target/bdev"
	"vhost-target/reactor"
	"vhost-target/scsi"
)

// LUNSpec places a bdev at a target/LUN of a controller.
type LUNSpec struct {
	Target uint8
	LUN    uint16
	Bdev   bdev.Bdev
}

// Config describes one controller.
type Config struct {
	Name       string
	SocketPath string
	SocketMode os.FileMode // default 0600
	// SocketUID/GID change the socket owner when >= 0 (QEMU running as another user).
	SocketUID, SocketGID int
	// NumQueues is the number of request queues offered (GET_QUEUE_NUM). A
	// front-end may start fewer; more (up to MaxQueues) are served too.
	NumQueues int
	// Reactors serve the request queues: queue i runs on Reactors[i % len].
	Reactors []*reactor.Reactor
	LUNs     []LUNSpec
	Logger   *slog.Logger
}

// MaxQueues bounds the request queues of one session (vring index < 2+MaxQueues).
const MaxQueues = 64

// lunRef ties a SCSI LUN to its bdev and a dense index used for per-queue channels.
type lunRef struct {
	id   uint16
	lun  *scsi.LUN
	bdev bdev.Bdev
	idx  int
}

type target struct {
	id   uint8
	t    *scsi.Target
	luns []lunRef // sorted by id
}

// Controller is one vhost-user-scsi socket and the sessions on it.
type Controller struct {
	cfg     Config
	log     *slog.Logger
	targets [256]*target
	bdevs   []bdev.Bdev // by lunRef.idx
	Stats   *ControllerStats

	ln       *net.UnixListener
	mu       sync.Mutex
	sessions map[*session]struct{}
	closed   bool
	wg       sync.WaitGroup
}

// NewController validates cfg and builds the SCSI targets.
func NewController(cfg Config) (*Controller, error) {
	if cfg.Name == "" {
		return nil, errors.New("vhost: controller needs a name")
	}
	if len(cfg.Reactors) == 0 {
		return nil, fmt.Errorf("vhost: controller %q has no reactors", cfg.Name)
	}
	if cfg.NumQueues < 1 || cfg.NumQueues > MaxQueues {
		return nil, fmt.Errorf("vhost: controller %q: num_queues %d not in 1..%d", cfg.Name, cfg.NumQueues, MaxQueues)
	}
	if len(cfg.LUNs) == 0 {
		return nil, fmt.Errorf("vhost: controller %q has no LUNs", cfg.Name)
	}
	if cfg.SocketMode == 0 {
		cfg.SocketMode = 0o600
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	c := &Controller{cfg: cfg, log: cfg.Logger.With("controller", cfg.Name), sessions: map[*session]struct{}{}}
	byTarget := map[uint8][]lunRef{}
	for i, l := range cfg.LUNs {
		if l.LUN > 16383 {
			return nil, fmt.Errorf("vhost: controller %q: LUN %d out of range", cfg.Name, l.LUN)
		}
		byTarget[l.Target] = append(byTarget[l.Target], lunRef{id: l.LUN, lun: scsi.NewLUN(l.LUN, l.Bdev.Info()), bdev: l.Bdev, idx: i})
		c.bdevs = append(c.bdevs, l.Bdev)
	}
	for tid, refs := range byTarget {
		sort.Slice(refs, func(i, j int) bool { return refs[i].id < refs[j].id })
		luns := make([]*scsi.LUN, len(refs))
		for i := range refs {
			luns[i] = refs[i].lun
		}
		st, err := scsi.NewTarget(tid, luns)
		if err != nil {
			return nil, fmt.Errorf("vhost: controller %q: target %d: %w", cfg.Name, tid, err)
		}
		c.targets[tid] = &target{id: tid, t: st, luns: refs}
	}
	c.Stats = newControllerStats(c)
	return c, nil
}

// Name returns the controller name.
func (c *Controller) Name() string { return c.cfg.Name }

// SocketPath returns the socket's path.
func (c *Controller) SocketPath() string { return c.cfg.SocketPath }

// Listen creates the socket (replacing a stale one) and starts accepting.
//
// Whoever can connect to the socket can make the target map memory and run
// I/O, so the path is checked first: its directory must not be writable by
// everyone unless it has the sticky bit (as /tmp does), or another user could
// swap the socket for their own between our checks and QEMU's connect. An
// existing path is never followed: Lstat sees a symlink as what it is, and
// only a stale socket is ever removed.
func (c *Controller) Listen() error {
	path := c.cfg.SocketPath
	dir := filepath.Dir(path)
	di, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("vhost: controller %q: socket directory: %w", c.cfg.Name, err)
	}
	if !di.IsDir() {
		return fmt.Errorf("vhost: controller %q: socket directory %s is not a directory", c.cfg.Name, dir)
	}
	if di.Mode().Perm()&0o002 != 0 && di.Mode()&os.ModeSticky == 0 {
		return fmt.Errorf("vhost: controller %q: socket directory %s is world-writable without the sticky bit (mode %v): any user could replace the socket",
			c.cfg.Name, dir, di.Mode())
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return fmt.Errorf("vhost: controller %q: %s exists and is not a socket (%v); not touching it", c.cfg.Name, path, fi.Mode().Type())
		}
		// A socket file left by a previous run: refuse if something still listens on it.
		if conn, err := net.Dial("unix", path); err == nil {
			conn.Close()
			return fmt.Errorf("vhost: controller %q: %s is in use by another process", c.cfg.Name, path)
		}
		os.Remove(path)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return fmt.Errorf("vhost: controller %q: listen: %w", c.cfg.Name, err)
	}
	ln.SetUnlinkOnClose(true)
	if err := os.Chmod(path, c.cfg.SocketMode); err != nil {
		ln.Close()
		return fmt.Errorf("vhost: controller %q: chmod %s: %w", c.cfg.Name, path, err)
	}
	if c.cfg.SocketUID >= 0 || c.cfg.SocketGID >= 0 {
		if err := os.Lchown(path, c.cfg.SocketUID, c.cfg.SocketGID); err != nil {
			ln.Close()
			return fmt.Errorf("vhost: controller %q: chown %s: %w", c.cfg.Name, path, err)
		}
	}
	c.ln = ln
	c.wg.Add(1)
	go c.accept()
	return nil
}

func (c *Controller) accept() {
	defer c.wg.Done()
	for {
		conn, err := c.ln.AcceptUnix()
		if err != nil {
			c.mu.Lock()
			closed := c.closed
			c.mu.Unlock()
			if !closed {
				c.log.Error("accept failed; controller stops accepting", "err", err)
			}
			return
		}
		s := newSession(c, conn)
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			conn.Close()
			return
		}
		c.sessions[s] = struct{}{}
		c.wg.Add(1)
		c.mu.Unlock()
		go func() {
			defer c.wg.Done()
			s.serve()
			c.mu.Lock()
			delete(c.sessions, s)
			c.mu.Unlock()
		}()
	}
}

// Sessions returns the number of connected front-ends.
func (c *Controller) Sessions() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.sessions)
}

// Close stops accepting, drains and stops every session's queues (in-flight
// I/O completes first), closes the connections and removes the socket.
func (c *Controller) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	ss := make([]*session, 0, len(c.sessions))
	for s := range c.sessions {
		ss = append(ss, s)
	}
	c.mu.Unlock()
	var err error
	if c.ln != nil {
		err = c.ln.Close()
	}
	for _, s := range ss {
		s.shutdown()
	}
	c.wg.Wait()
	return err
}
