package vhost

// Dirty page logging for live migration (issue 12): VHOST_F_LOG_ALL with
// protocol feature LOG_SHMFD. While the front-end has LOG_ALL set and has
// given a log (SET_LOG_BASE), every write into guest memory is marked in it
// after it is made: data read from a bdev and response headers (queue.finish),
// used rings (virtq, through SET_VRING_ADDR's log address). Turning logging
// on or off, or a new log, restarts the running rings (drained first, as for
// a new inflight area), so a queue's log never changes under its reactor.

import (
	"golang.org/x/sys/unix"

	"vhost-target/vhost/dirtylog"
	"vhost-target/vhost/guestmem"
	"vhost-target/vhost/proto"
	"vhost-target/vhost/virtq"
)

// offered returns the virtio features this controller offers.
func (s *session) offered() uint64 {
	f := uint64(offeredFeatures)
	if s.c.isBlk() {
		f = s.blkOffered()
	}
	if s.c.cfg.Migration {
		f |= 1 << proto.FLogAll
	}
	return f
}

// offeredProtocol returns the protocol features this controller offers.
func (s *session) offeredProtocol() uint64 {
	f := uint64(offeredProtocolFeatures)
	if s.c.isBlk() {
		// QEMU's vhost-user-blk reads its config space from the back-end,
		// and hears of a resize on the back-end request channel.
		f |= 1<<proto.PFConfig | 1<<proto.PFBackendReq
	}
	if s.c.cfg.Migration {
		f |= 1 << proto.PFLogShmFD
	}
	return f
}

// logging reports whether writes must be marked: LOG_ALL negotiated and a
// log given.
func (s *session) logging() bool {
	return s.features&(1<<proto.FLogAll) != 0 && s.dirty != nil
}

// setLogBase maps the log the front-end sends (an fd, its size and offset)
// and answers, as QEMU waits for an answer to this one (with LOG_SHMFD) and
// DPDK and libvhost-user always answer. Like them it takes a log whether or
// not LOG_SHMFD was acked; without an fd (QEMU's log in its own memory,
// without LOG_SHMFD) there is nothing to mark, and a migration that counted
// on the marks would corrupt the guest: refused.
func (s *session) setLogBase(m *proto.Msg) error {
	if len(m.FDs) != 1 {
		return protoErr("SET_LOG_BASE without the log's fd (LOG_SHMFD)")
	}
	l, err := proto.DecodeLog(m)
	if err != nil {
		return err
	}
	log, err := dirtylog.Map(m.FDs[0], l.MmapSize, l.MmapOffset)
	if err != nil {
		return protoErr("SET_LOG_BASE: %v", err)
	}
	err = s.restartAround(func() error {
		if err := s.dirty.Close(); err != nil {
			s.log.Warn("unmapping the previous dirty page log", "err", err)
		}
		s.dirty = log
		return nil
	})
	if err != nil {
		return err
	}
	s.log.Info("dirty page log received", "bytes", l.MmapSize, "covers_gib", float64(log.Pages())*dirtylog.PageSize/(1<<30),
		"logging", s.logging())
	return s.conn.ReplyU64(m.Request, 0)
}

// setLogFD keeps the eventfd the front-end may give to hear of log writes
// (only an eventfd: a reactor writes it, and a pipe could block). It takes
// effect at the next ring start; running rings are restarted for it.
func (s *session) setLogFD(m *proto.Msg) error {
	fd := m.FDs[0]
	if err := checkEventFD(fd); err != nil {
		return protoErr("SET_LOG_FD: %v", err)
	}
	m.FDs[0] = -1 // taken
	return s.restartAround(func() error {
		if s.logKick >= 0 {
			unix.Close(s.logKick)
		}
		s.logKick = fd
		return nil
	})
}

// logChanged restarts the running rings when SET_FEATURES turned LOG_ALL on
// or off, so that they start, or stop, marking their writes.
func (s *session) logChanged(before uint64) error {
	if (before^s.features)&(1<<proto.FLogAll) == 0 {
		return nil
	}
	s.log.Info("dirty page logging", "on", s.features&(1<<proto.FLogAll) != 0, "log", s.dirty != nil)
	return s.restartAround(func() error { return nil })
}

// ringLog sets the log of vring v's used ring in c: only while logging, and
// only when the front-end asked for it (VHOST_VRING_F_LOG in SET_VRING_ADDR,
// with the used ring's guest-physical address).
func (s *session) ringLog(v *vring, c *virtq.Config) {
	if s.logging() && v.addr.Flags&proto.VringAddrFlagLogUsed != 0 {
		c.Log, c.UsedLogGPA = s.dirty, v.addr.Log
	}
}

// markWritten marks the guest pages a completed request wrote: its
// device-writable segments, up to written bytes.
func (q *queue) markWritten(r *request, written uint32) {
	if debugUnlogged {
		return
	}
	markSegments(q.log, q.s.mem, r.chain.Writable(), written)
}

// markSegments marks the pages of segs (host bytes of guest memory mem) up
// to written bytes in log.
func markSegments(log *dirtylog.Log, mem *guestmem.Table, segs [][]byte, written uint32) {
	left := uint64(written)
	for _, seg := range segs {
		if left == 0 {
			return
		}
		n := min(uint64(len(seg)), left)
		if gpa, ok := mem.HostGPA(seg); ok {
			log.Mark(gpa, n)
		}
		left -= n
	}
}

// push completes a side queue's chain: its written bytes are marked while
// logging, then the used element is pushed.
func (sq *sideQueue) push(c *virtq.Chain, written uint32) {
	if sq.log != nil && written > 0 {
		markSegments(sq.log, sq.s.mem, c.Writable(), written)
	}
	sq.vq.Push(c.Head, written)
}
