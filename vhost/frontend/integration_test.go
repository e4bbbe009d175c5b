package frontend_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"math/rand"
	"path/filepath"
	"testing"
	"time"

	"vhost-target/bdev/malloc"
	"vhost-target/reactor"
	"vhost-target/vhost"
	"vhost-target/vhost/frontend"
	"vhost-target/vhost/proto"
)

// startTarget runs the real target in-process: one reactor, one controller
// with an 8 MiB malloc disk at target 0 LUN 0.
func startTarget(t *testing.T, mode reactor.Mode, nq int) (string, *malloc.Disk) {
	t.Helper()
	r, err := reactor.New(0, -1, mode)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	disk, err := malloc.New("m0", 8<<20, 512, [16]byte{1})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "c0")
	c, err := vhost.NewController(vhost.Config{
		Name: "c0", SocketPath: sock, NumQueues: nq, Reactors: []*reactor.Reactor{r}, SocketUID: -1, SocketGID: -1,
		LUNs:   []vhost.LUNSpec{{Target: 0, LUN: 0, Bdev: disk}},
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Listen(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Close()
		r.Stop()
		disk.Close()
	})
	return sock, disk
}

func rw10(op byte, lba uint32, blocks uint16) []byte {
	c := make([]byte, 10)
	c[0] = op
	binary.BigEndian.PutUint32(c[2:], lba)
	binary.BigEndian.PutUint16(c[7:], blocks)
	return c
}

// exercise writes and reads back on every queue, asks INQUIRY, and sends a
// LUN reset when the control queue runs.
func exercise(t *testing.T, d *frontend.Device, disk *malloc.Disk, seed int64) {
	t.Helper()
	rnd := rand.New(rand.NewSource(seed))
	o := d.Options()
	for qi := 0; qi < o.NumQueues; qi++ {
		r, err := d.Do(frontend.Command{Queue: qi, CDB: []byte{0x12, 0, 0, 0, 96, 0}, DataInLen: 96})
		if err != nil || r.Response != 0 || r.Status != 0 || r.DataIn[0] != 0 {
			t.Fatalf("queue %d INQUIRY: %v %+v", qi, err, r)
		}
		data := make([]byte, 8*512)
		rnd.Read(data)
		lba := uint32(rnd.Intn(1000))
		r, err = d.Do(frontend.Command{Queue: qi, CDB: rw10(0x2a, lba, 8), DataOut: data, Segments: 1 + qi%5})
		if err != nil || r.Response != 0 || r.Status != 0 {
			t.Fatalf("queue %d WRITE: %v %+v", qi, err, r)
		}
		r, err = d.Do(frontend.Command{Queue: qi, CDB: rw10(0x28, lba, 8), DataInLen: len(data), Segments: 4})
		if err != nil || r.Response != 0 || r.Status != 0 || r.Resid != 0 {
			t.Fatalf("queue %d READ: %v %+v", qi, err, r)
		}
		if !bytes.Equal(r.DataIn, data) || !bytes.Equal(disk.Bytes()[lba*512:lba*512+4096], data) {
			t.Fatalf("queue %d: read back differs", qi)
		}
		if err := d.Queue(qi).Err(); err != nil {
			t.Fatal(err)
		}
	}
	if d.Vring(frontend.ControlVring).Started() {
		if resp, err := d.TMF(0, 0, frontend.TMFLogicalUnitReset, 0); err != nil || resp != 0 {
			t.Fatalf("LUN RESET: %d %v", resp, err)
		}
		if resp, err := d.TMF(9, 0, frontend.TMFLogicalUnitReset, 0); err != nil || resp != 3 {
			t.Fatalf("LUN RESET of a missing target: %d %v (want BAD_TARGET)", resp, err)
		}
	}
}

func TestIntegrationStartSequences(t *testing.T) {
	variants := []struct {
		name string
		o    frontend.Options
	}{
		{"default", frontend.Options{}},
		{"two_regions_unaligned_offset", frontend.Options{Regions: 2, MmapOffset: 4096 + 512, MemSize: 32 << 20}},
		{"plain_rings", frontend.Options{NoEventIdx: true, NoIndirect: true}},
		{"no_protocol_features", frontend.Options{NoProtocolFeatures: true}},
		{"seabios_like", frontend.Options{SkipControlQueues: true, NoEventIdx: true, NoIndirect: true,
			AckFeatures: func(uint64) uint64 { return 1<<proto.FVersion1 | 1<<proto.FProtocolFeatures }}},
		{"qemu_extra_bits", frontend.Options{AckFeatures: func(off uint64) uint64 {
			return off | 1<<proto.FRingReset | 1<<proto.FAnyLayout // QEMU 7.2 passes these unfiltered
		}}},
		{"wrap", frontend.Options{QueueSize: 16, VringBase: 65530, NoIndirect: true}},
		{"multiqueue_need_reply", frontend.Options{NumQueues: 4, NeedReplyAll: true}},
	}
	for _, mode := range []reactor.Mode{reactor.Busy, reactor.Adaptive} {
		for _, v := range variants {
			t.Run(fmt.Sprintf("%s/mode%d", v.name, mode), func(t *testing.T) {
				sock, disk := startTarget(t, mode, 4)
				v.o.Timeout = 5 * time.Second
				d, err := frontend.Dial(sock, v.o)
				if err != nil {
					t.Fatal(err)
				}
				exercise(t, d, disk, 1)
				if err := d.Reset(); err != nil {
					d.Abort()
					t.Fatalf("reset: %v", err)
				}
				exercise(t, d, disk, 2)
				if err := d.Close(); err != nil {
					t.Fatalf("close: %v", err)
				}
			})
		}
	}
}

func TestIntegrationCrossRegionBuffer(t *testing.T) {
	sock, disk := startTarget(t, reactor.Adaptive, 1)
	d, err := frontend.Dial(sock, frontend.Options{Regions: 2, MemSize: 32 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	data := bytes.Repeat([]byte("0123456789abcdef"), 256)
	half := d.Options().MemSize / 2
	r, err := d.Do(frontend.Command{CDB: rw10(0x2a, 7, 8), DataOut: data, DataGPA: half - 1536})
	if err != nil || r.Response != 0 || r.Status != 0 {
		t.Fatalf("write straddling regions: %v %+v", err, r)
	}
	if !bytes.Equal(disk.Bytes()[7*512:7*512+4096], data) {
		t.Fatal("disk content differs")
	}
	r, err = d.Do(frontend.Command{CDB: rw10(0x28, 7, 8), DataInLen: 4096, DataGPA: half - 2560, Direct: true})
	if err != nil || r.Response != 0 || r.Status != 0 || !bytes.Equal(r.DataIn, data) {
		t.Fatalf("read straddling regions: %v %+v", err, r)
	}
}

func TestIntegrationAsync(t *testing.T) {
	sock, disk := startTarget(t, reactor.Busy, 2)
	d, err := frontend.Dial(sock, frontend.Options{NumQueues: 2, SlotDataSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := d.Close(); err != nil {
			t.Error(err)
		}
	}()
	// Phase 1 writes byte b to every byte of block b (b < 200); phase 2
	// reads blocks back at random and checks them.
	run := func(q *frontend.Queue, total int, write bool) {
		sent, done := 0, 0
		deadline := time.Now().Add(20 * time.Second)
		for done < total {
			for q.Free() > 0 && sent < total {
				s := q.Get()
				lba := uint32(sent % 200)
				if write {
					for k := 0; k < 512; k++ {
						s.Data[k] = byte(lba)
					}
					q.Prepare(s, 0, 0, rw10(0x2a, lba, 1), frontend.DirOut, 512)
				} else {
					lba = uint32((sent * 7919) % 200)
					clear(s.Data[:512])
					q.Prepare(s, 0, 0, rw10(0x28, lba, 1), frontend.DirIn, 512)
				}
				s.User = uint64(lba)
				q.Submit(s)
				sent++
			}
			q.Kick()
			q.Reap(func(s *frontend.Slot) {
				if s.Response() != 0 || s.Status() != 0 {
					t.Fatalf("slot %d: response %d status %d", s.ID, s.Response(), s.Status())
				}
				if s.Dir() == frontend.DirIn && (s.Data[0] != byte(s.User) || s.Data[511] != byte(s.User)) {
					t.Fatalf("lba %d read %d..%d", s.User, s.Data[0], s.Data[511])
				}
				done++
				q.Put(s)
			})
			if time.Now().After(deadline) {
				t.Fatalf("queue %d: %d of %d done, %d in flight", q.Index(), done, total, q.Inflight())
			}
			if err := q.Err(); err != nil {
				t.Fatal(err)
			}
		}
	}
	for qi := 0; qi < 2; qi++ {
		q := d.Queue(qi)
		q.SetInterrupts(qi == 0) // one queue polled with interrupts, one without
		run(q, 200, true)
		run(q, 3000, false)
	}
	if disk.Bytes()[199*512] != 199 {
		t.Errorf("disk block 199 = %d", disk.Bytes()[199*512])
	}
}

// A looping descriptor chain must neither hang the target nor stop it from
// serving the next connection.
func TestIntegrationHostileLoopThenReconnect(t *testing.T) {
	sock, disk := startTarget(t, reactor.Adaptive, 1)
	d, err := frontend.Dial(sock, frontend.Options{Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	q := d.Queue(0)
	desc, _, _ := q.RingGPAs()
	q.AddRawChain([]frontend.Desc{
		{Addr: desc, Len: frontend.ReqSize, Flags: frontend.DescFNext, Next: 1},
		{Addr: desc, Len: 16, Flags: frontend.DescFNext | frontend.DescFWrite, Next: 0},
	})
	q.Kick()
	time.Sleep(50 * time.Millisecond)
	d.Abort()

	d2, err := frontend.Dial(sock, frontend.Options{})
	if err != nil {
		t.Fatalf("reconnect after a hostile session: %v", err)
	}
	exercise(t, d2, disk, 3)
	if err := d2.Close(); err != nil {
		t.Fatal(err)
	}
}
