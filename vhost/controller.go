// Package vhost serves vhost-user-scsi and vhost-user-blk controllers: one
// unix socket each, a session per connected front-end (QEMU or any
// vhost-user VMM), and the virtio-scsi and virtio-blk request paths that run
// on reactors (blkdev.go has what differs for blk).
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
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"vhost-target/bdev"
	"vhost-target/reactor"
)

// LUNSpec places a bdev at a target/LUN of a controller.
type LUNSpec struct {
	Target uint8
	LUN    uint16
	Bdev   bdev.Bdev
}

// Kind is the virtio device a controller presents.
type Kind int

const (
	// KindSCSI is virtio-scsi (vhost-user-scsi): targets and LUNs, a control
	// and an event queue before the request queues.
	KindSCSI Kind = iota
	// KindBlk is virtio-blk (vhost-user-blk): one disk, Config.Disk, and
	// request queues only. Cloud Hypervisor, Firecracker and crosvm speak
	// only this one.
	KindBlk
)

func (k Kind) String() string {
	if k == KindBlk {
		return "blk"
	}
	return "scsi"
}

// Config describes one controller.
type Config struct {
	Name string
	// Kind is scsi (the zero value) or blk.
	Kind       Kind
	SocketPath string
	SocketMode os.FileMode // default 0600
	// SocketUID/GID change the socket owner when >= 0 (QEMU running as another user).
	SocketUID, SocketGID int
	// NumQueues is the number of request queues offered (GET_QUEUE_NUM). A
	// front-end may start fewer; more (up to MaxQueues) are served too.
	NumQueues int
	// MaxSessions is how many front-ends are served at once (default 1); a
	// connection beyond it is closed with a WARN line. See the lifecycle in
	// lifecycle.go.
	MaxSessions int
	// Reactors serve the request queues: queue i runs on Reactors[i % len].
	Reactors []*reactor.Reactor
	// LUNs are a scsi controller's LUNs; a blk controller has none.
	LUNs []LUNSpec
	// Disk is a blk controller's disk (required); ReadOnly refuses its
	// writes (VIRTIO_BLK_F_RO) even when the bdev takes them.
	Disk     bdev.Bdev
	ReadOnly bool
	Logger   *slog.Logger
	// Migration offers VHOST_F_LOG_ALL and protocol feature LOG_SHMFD: dirty
	// page logging, which QEMU needs to live-migrate the VM (migration.go).
	// The configuration turns it on unless a controller says migration =
	// false; the zero value here keeps library users' controllers as they
	// were.
	Migration bool
}

// MaxQueues bounds the request queues of one session (vring index < 2+MaxQueues).
const MaxQueues = 64

// Controller is one vhost-user-scsi or vhost-user-blk socket and the
// sessions on it.
type Controller struct {
	cfg   Config
	log   *slog.Logger
	Stats *ControllerStats

	// table is the current LUN table (luns.go), loaded by request queues
	// once per command and by the control queue; replaced under lunsMu.
	table atomic.Pointer[lunTable]
	// lunsMu serialises LUN changes (AddLUN, RemoveLUN, CapacityChanged)
	// with request queues starting and stopping, and guards queues (every
	// running request queue of every session) and slotUsed. Lock order:
	// lunsMu, then mu or Stats.mu; never the other way round.
	lunsMu   sync.Mutex
	queues   map[*queue]struct{}
	slotUsed []bool
	// crashed is set by SimulateCrash (under lunsMu): queues started from
	// then on behave as crashed ones.
	crashed bool

	ln *net.UnixListener
	mu sync.Mutex
	// changed is signalled (with mu held) when a session leaves or the
	// controller closes: admission waits on it for hung-up sessions to drain.
	changed  *sync.Cond
	sessions map[*session]struct{}
	nextID   uint64
	closed   bool
	wg       sync.WaitGroup
}

// NewController validates cfg and builds the SCSI targets. A controller may
// have no LUNs (SPDK's vhost_create_scsi_controller makes them empty): it
// serves, and every target answers BAD_TARGET until AddLUN.
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
	if cfg.SocketMode == 0 {
		cfg.SocketMode = 0o600
	}
	if cfg.MaxSessions == 0 {
		cfg.MaxSessions = 1
	}
	if cfg.MaxSessions < 0 {
		return nil, fmt.Errorf("vhost: controller %q: max_sessions %d", cfg.Name, cfg.MaxSessions)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	c := &Controller{cfg: cfg, log: cfg.Logger.With("controller", cfg.Name), sessions: map[*session]struct{}{},
		queues: map[*queue]struct{}{}}
	c.changed = sync.NewCond(&c.mu)
	c.table.Store(&lunTable{})
	c.Stats = newControllerStats(c)
	switch cfg.Kind {
	case KindSCSI:
		if cfg.Disk != nil || cfg.ReadOnly {
			return nil, fmt.Errorf("vhost: controller %q: a scsi controller has LUNs, not a disk", cfg.Name)
		}
	case KindBlk:
		if len(cfg.LUNs) > 0 {
			return nil, fmt.Errorf("vhost: controller %q: a blk controller has one disk, not LUNs", cfg.Name)
		}
		if cfg.Disk == nil {
			return nil, fmt.Errorf("vhost: controller %q: a blk controller needs a disk", cfg.Name)
		}
		// The disk is the table's one LUN (blkdev.go): channels, counters,
		// resize and draining work as for a SCSI LUN.
		if err := c.addLUN(LUNSpec{Bdev: cfg.Disk}); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("vhost: controller %q: unknown kind %d", cfg.Name, cfg.Kind)
	}
	// The configured LUNs are added as at runtime, with no session to tell.
	for _, l := range cfg.LUNs {
		if err := c.AddLUN(l); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// Kind returns what the controller presents: scsi or blk.
func (c *Controller) Kind() Kind { return c.cfg.Kind }

// Disk returns a blk controller's bdev (nil for scsi) and whether it is
// presented read-only.
func (c *Controller) Disk() (bdev.Bdev, bool) { return c.cfg.Disk, c.cfg.ReadOnly }

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
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			conn.Close()
			return
		}
		c.wg.Add(1)
		c.mu.Unlock()
		go func() {
			defer c.wg.Done()
			s := c.admit(conn)
			if s == nil {
				return
			}
			s.serve()
			c.mu.Lock()
			delete(c.sessions, s)
			c.changed.Broadcast()
			c.mu.Unlock()
		}()
	}
}

// admit decides whether conn becomes a session (lifecycle.go, "Admission").
// Sessions whose front-end has hung up but whose queues still drain do not
// count, but admission waits for them to finish first: a VM that is killed
// and started again at once must get its disk, and only after every request
// of the dead one has completed. It returns nil when conn was refused.
func (c *Controller) admit(conn *net.UnixConn) *session {
	peer := peerName(conn)
	c.mu.Lock()
	for {
		open, leaving := 0, 0
		for s := range c.sessions {
			// A front-end that died a moment ago may not have been read to
			// EOF yet: its socket already says so.
			if s.hungUp || peerGone(s.uconn) {
				leaving++
			} else {
				open++
			}
		}
		if c.closed || open >= c.cfg.MaxSessions || leaving == 0 {
			break
		}
		c.changed.Wait() // the leaving session's goroutine broadcasts when it is gone
	}
	if c.closed {
		c.mu.Unlock()
		conn.Close()
		return nil
	}
	others := make([]string, 0, len(c.sessions))
	for s := range c.sessions {
		others = append(others, fmt.Sprintf("session %d (%s)", s.id, s.peer))
	}
	sort.Strings(others)
	if len(c.sessions) >= c.cfg.MaxSessions {
		c.mu.Unlock()
		c.Stats.refused.Add(1)
		c.log.Warn("front-end refused: the controller already serves max_sessions front-ends (set max_sessions = 2 for a same-host live migration)",
			"peer", peer, "max_sessions", c.cfg.MaxSessions, "connected", strings.Join(others, ", "))
		conn.Close()
		return nil
	}
	c.nextID++
	s := newSession(c, conn, c.nextID, peer)
	c.sessions[s] = struct{}{}
	c.mu.Unlock()
	if len(others) > 0 {
		s.log.Warn("another front-end connected while one is served: the LUNs are shared between them (a live migration, or two VMs writing the same disks)",
			"peer", peer, "connected", strings.Join(others, ", "), "max_sessions", c.cfg.MaxSessions)
	}
	return s
}

// hangUp marks s as gone from the front-end's side: it no longer counts
// against max_sessions, though it holds its queues until they drain.
func (c *Controller) hangUp(s *session) {
	c.mu.Lock()
	s.hungUp = true
	c.changed.Broadcast()
	c.mu.Unlock()
}

// peerGone reports whether the front-end end of conn is closed (POLLRDHUP or
// POLLHUP), without reading from it.
func peerGone(conn *net.UnixConn) bool {
	raw, err := conn.SyscallConn()
	if err != nil {
		return true
	}
	gone := false
	raw.Control(func(fd uintptr) {
		fds := [1]unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
		if n, err := unix.Poll(fds[:], 0); err == nil && n == 1 {
			gone = fds[0].Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR|unix.POLLNVAL) != 0
		}
	})
	return gone
}

// peerName names the process at the other end of conn for log lines:
// "pid 1234 (qemu-system-x86) uid 0", from SO_PEERCRED and /proc.
func peerName(conn *net.UnixConn) string {
	raw, err := conn.SyscallConn()
	if err != nil {
		return "unknown peer"
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil || cerr != nil {
		return "unknown peer"
	}
	comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", cred.Pid))
	return fmt.Sprintf("pid %d (%s) uid %d", cred.Pid, strings.TrimSpace(string(comm)), cred.Uid)
}

// MaxSessions returns how many front-ends the controller serves at once.
func (c *Controller) MaxSessions() int { return c.cfg.MaxSessions }

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
	c.changed.Broadcast()
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

// SimulateCrash is a test hook: it ends the controller as if its process had
// died between taking requests from the request queues and publishing them.
// From the moment it is called, no request queue takes a chain or stores a
// used index again; requests already submitted to a bdev run to completion
// (their responses and used elements may be written, as a process may write
// them before it dies), but the driver never sees them published. Then the
// controller closes as Close does: sessions are dropped (the front-end sees
// its connection end), the socket is removed, and SimulateCrash returns once
// no bdev IO of this controller is in flight and nothing of it touches guest
// memory any more. The control and event queues, which complete in order,
// stop as in Close. A new Controller on the same socket path then plays the
// restarted process: a front-end that reconnects with SET_INFLIGHT_FD gets
// the requests in flight at the crash executed again and completed once.
func (c *Controller) SimulateCrash() error {
	c.lunsMu.Lock()
	c.crashed = true
	qs := make([]*queue, 0, len(c.queues))
	for q := range c.queues {
		qs = append(qs, q)
	}
	c.lunsMu.Unlock()
	for _, q := range qs {
		// On the queue's reactor, between two polls: the crash falls after
		// whatever that reactor last did. A reactor that is gone runs nothing.
		q.r.Call(func() { q.crashed = true })
	}
	c.log.Warn("simulated crash: request queues stopped without publishing")
	return c.Close()
}
