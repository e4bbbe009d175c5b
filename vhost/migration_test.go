package vhost_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"vhost-target/reactor"
	"vhost-target/vhost"
	"vhost-target/vhost/dirtylog"
	"vhost-target/vhost/frontend"
	"vhost-target/vhost/proto"
)

// TestDirtyLog: while LOG_ALL is on and a log is given, every page of guest
// memory the device changes (read data, response headers, the used ring) is
// marked in the log, which is what live migration needs; with LOG_ALL off
// nothing is marked. Checked by comparing all guest memory before and after
// each command, for reads and writes, in both poll modes. (The driver's own
// writes change memory too: the write command sends the pattern its buffer
// already holds, and the rings' avail entries share the used ring's page.)
// Fails without queue.markWritten, the used-ring marks or the control
// queue's (sideQueue.push; a TMF is answered while logging).
func TestDirtyLog(t *testing.T) {
	for _, mode := range []reactor.Mode{reactor.Busy, reactor.Adaptive} {
		e := newEnv(t, 1, mode)
		disk := e.disk("m0", 1<<20, 512)
		sock := e.controllerWith(fmt.Sprintf("c%d", mode), 1, func(c *vhost.Config) { c.Migration = true }, lun(0, 0, disk))
		dev, err := frontend.Dial(sock, frontend.Options{NumQueues: 1, Timeout: 3 * time.Second,
			ProtocolMask: 1<<proto.PFMQ | 1<<proto.PFReplyAck | 1<<proto.PFLogShmFD})
		if err != nil {
			t.Fatal(err)
		}
		if dev.OfferedFeatures()&(1<<proto.FLogAll) == 0 || dev.ProtocolFeatures()&(1<<proto.PFLogShmFD) == 0 {
			t.Fatalf("LOG_ALL / LOG_SHMFD not offered: %#x %#x", dev.OfferedFeatures(), dev.ProtocolFeatures())
		}
		log, logBytes := giveLog(t, dev)
		// SET_LOG_FD: an eventfd the queues write after publishing while logging.
		logKick, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(logKick)
		if err := dev.Send(proto.SetLogFD, proto.FlagVersion, nil, logKick); err != nil {
			t.Fatal(err)
		}
		kicks := func() uint64 {
			var b [8]byte
			if n, err := unix.Read(logKick, b[:]); n != 8 || err != nil {
				return 0
			}
			return binary.LittleEndian.Uint64(b[:])
		}
		snapshot := func() [][]byte {
			var s [][]byte
			for _, r := range dev.MemTable() {
				s = append(s, bytes.Clone(dev.Mem(r.GPA, int(r.Size))))
			}
			return s
		}
		// changedUnmarked lists pages that differ from before and are not marked.
		changedUnmarked := func(before [][]byte) (changed int, missing []uint64) {
			for i, r := range dev.MemTable() {
				now := dev.Mem(r.GPA, int(r.Size))
				for off := uint64(0); off < r.Size; off += dirtylog.PageSize {
					n := min(dirtylog.PageSize, r.Size-off)
					if !bytes.Equal(before[i][off:off+n], now[off:off+n]) {
						changed++
						if p := (r.GPA + off) / dirtylog.PageSize; !log.Marked(p) {
							missing = append(missing, p)
						}
					}
				}
			}
			return changed, missing
		}
		pattern := bytes.Repeat([]byte{0xa5, 0x5a, 0x3c, 0xc3}, 8192/4)
		run := func(what string, cmd frontend.Command) {
			t.Helper()
			if r, err := dev.Do(cmd); err != nil || r.Status != 0 {
				t.Fatalf("mode %v: %s: %v", mode, what, err)
			}
		}
		run("write", frontend.Command{CDB: rw10(0x2a, 0, 16), DataOut: pattern})

		setLogging(t, dev, true)
		clear(logBytes)
		before := snapshot()
		run("read", frontend.Command{CDB: rw10(0x28, 0, 16), DataInLen: 8192})
		run("write", frontend.Command{CDB: rw10(0x2a, 64, 16), DataOut: pattern})
		// The control queue's answers are marked too (sideQueue.push).
		if r, err := dev.TMF(0, 0, frontend.TMFQueryTaskSet, 0); err != nil || r != 0 {
			t.Fatalf("mode %v: TMF: %v, response %d", mode, err, r)
		}
		if changed, missing := changedUnmarked(before); changed == 0 || len(missing) != 0 {
			var rings []string
			for i := 0; i < dev.NumVrings(); i++ {
				d, a, u := dev.Vring(i).RingGPAs()
				rings = append(rings, fmt.Sprintf("%d: desc %#x avail %#x used %#x", i, d, a, u))
			}
			t.Fatalf("mode %v, logging: %d pages changed, %d of them not marked: %v; rings %v", mode, changed, len(missing), missing, rings)
		}
		if n := kicks(); n == 0 {
			t.Fatalf("mode %v: SET_LOG_FD's eventfd not written while logging", mode)
		}

		setLogging(t, dev, false)
		kicks() // the logging ring's last publish, as it stopped
		clear(logBytes)
		run("read", frontend.Command{CDB: rw10(0x28, 0, 16), DataInLen: 8192})
		for p := uint64(0); p < log.Pages(); p++ {
			if log.Marked(p) {
				t.Fatalf("mode %v: page %d marked with logging off", mode, p)
			}
		}
		if n := kicks(); n != 0 {
			t.Fatalf("mode %v: SET_LOG_FD's eventfd written %d times with logging off", mode, n)
		}
		dev.Close()
	}
}

// giveLog sends SET_LOG_BASE with a log for all of dev's guest memory, sized
// as QEMU sizes it (8 bytes per 256 KiB), and returns it and its bytes.
func giveLog(t *testing.T, dev *frontend.Device) (*dirtylog.Log, []byte) {
	t.Helper()
	var end uint64
	for _, r := range dev.MemTable() {
		end = max(end, r.GPA+r.Size)
	}
	size := (end/(dirtylog.PageSize*64) + 1) * 8
	fd, err := unix.MemfdCreate("log", unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		t.Fatal(err)
	}
	logBytes, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(logBytes) })
	if _, err := dev.Call(proto.SetLogBase, proto.Log{MmapSize: size}.Encode(), fd); err != nil {
		t.Fatalf("SET_LOG_BASE: %v", err)
	}
	return dirtylog.FromBytes(logBytes), logBytes
}

// setLogging turns LOG_ALL on or off as QEMU's vhost_dev_set_log does:
// SET_FEATURES, then every ring's address again, with the log flag and the
// used ring's guest-physical address when on. It returns once the target
// has handled them.
func setLogging(t *testing.T, dev *frontend.Device, on bool) {
	t.Helper()
	f := dev.Features() &^ (1 << proto.FLogAll)
	var flags uint32
	if on {
		f |= 1 << proto.FLogAll
		flags = proto.VringAddrFlagLogUsed
	}
	if err := dev.SetFeatures(f); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < dev.NumVrings(); i++ {
		desc, avail, used := dev.Vring(i).RingGPAs()
		uva := func(gpa uint64) uint64 { u, _ := dev.UVA(gpa); return u }
		a := proto.VringAddr{Index: uint32(i), Flags: flags, Desc: uva(desc), Used: uva(used), Avail: uva(avail), Log: used}
		if err := dev.Message(proto.SetVringAddr, false, a.Encode()); err != nil {
			t.Fatal(err)
		}
	}
	// A message with an answer: the ones before it have been handled.
	if _, err := dev.Call(proto.GetFeatures, nil); err != nil {
		t.Fatal(err)
	}
}
