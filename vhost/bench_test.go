package vhost_test

import (
	"encoding/binary"
	"runtime"
	"testing"

	"vhost-target/reactor"
	"vhost-target/vhost/frontend"
)

// benchIO drives qd requests through the target's whole I/O path (virtqueue,
// virtio-scsi, SCSI, malloc bdev) from an in-process front-end. allocs/op
// counts every allocation in the process: target and front-end.
func benchIO(b *testing.B, op byte, bs, qd int) {
	e := newEnv(&testing.T{}, 1, reactor.Busy)
	defer e.close()
	d := e.disk("m0", 256<<20, 512)
	sock := e.controller("c0", 1, lun(0, 0, d))
	dev, err := frontend.Dial(sock, frontend.Options{QueueSize: 256, Slots: qd, SlotDataSize: bs})
	if err != nil {
		b.Fatal(err)
	}
	defer dev.Close()
	q := dev.Queue(0)
	q.SetInterrupts(false)
	blocks := uint64(256<<20) / uint64(bs)
	var cdb [16]byte
	dir := frontend.DirIn
	if op == 0x8a {
		dir = frontend.DirOut
	}
	var lba uint64
	submit := func(s *frontend.Slot) {
		lba = (lba + 7919) % blocks
		cdb[0] = op
		binary.BigEndian.PutUint64(cdb[2:], lba*uint64(bs/512))
		binary.BigEndian.PutUint32(cdb[10:], uint32(bs/512))
		q.Prepare(s, 0, 0, cdb[:], dir, bs)
		q.Submit(s)
	}
	var bad int
	done := 0
	reap := func(s *frontend.Slot) {
		if s.Response() != 0 || s.Status() != 0 {
			bad++
		}
		done++
		q.Put(s)
	}
	runtime.GC()
	b.ReportAllocs()
	b.SetBytes(int64(bs))
	b.ResetTimer()
	inflight := 0
	for issued := 0; done < b.N; {
		for inflight < qd && issued < b.N {
			s := q.Get()
			if s == nil {
				break
			}
			submit(s)
			inflight++
			issued++
		}
		q.Kick()
		n := q.Reap(reap)
		inflight -= n
	}
	b.StopTimer()
	if bad > 0 {
		b.Fatalf("%d requests failed", bad)
	}
}

func BenchmarkRead4KQD1(b *testing.B)   { benchIO(b, 0x88, 4096, 1) }
func BenchmarkRead4KQD32(b *testing.B)  { benchIO(b, 0x88, 4096, 32) }
func BenchmarkWrite4KQD32(b *testing.B) { benchIO(b, 0x8a, 4096, 32) }
