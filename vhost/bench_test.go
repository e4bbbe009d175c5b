package vhost_test

import (
	"bytes"
	"encoding/binary"
	"io"
	"log/slog"
	"runtime"
	"testing"

	"vhost-target/reactor"
	"vhost-target/vhost/frontend"
)

// benchIO drives qd requests through the target's whole I/O path (virtqueue,
// virtio-scsi, SCSI, malloc bdev) from an in-process front-end. allocs/op
// counts every allocation in the process: target and front-end. The disk is
// written in full before the timed part, and every read is checked to return
// that data: a benchmark of reads of never-written blocks measures the
// backing store's shortcut for them, not a read.
func benchIO(b *testing.B, op byte, bs, qd int) { benchIOWith(b, op, bs, qd, false) }

// benchIOWith is benchIO, with the inflight area (INFLIGHT_SHMFD) when inflight is set.
func benchIOWith(b *testing.B, op byte, bs, qd int, tracked bool) {
	e := newEnv(&testing.T{}, 1, reactor.Busy)
	defer e.close()
	// The disk's INFO line (backing, populate time) would split the
	// benchmark's result line.
	saved := slog.Default()
	slog.SetDefault(slog.New(slog.NewTextHandler(io.Discard, nil)))
	d := e.disk("m0", 256<<20, 512)
	slog.SetDefault(saved)
	sock := e.controller("c0", 1, lun(0, 0, d))
	dev, err := frontend.Dial(sock, frontend.Options{QueueSize: 256, Slots: qd, SlotDataSize: bs, Inflight: tracked})
	if err != nil {
		b.Fatal(err)
	}
	defer dev.Close()
	fillDisk(b, dev, 256<<20)
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
		if s.Response() != 0 || s.Status() != 0 || dir == frontend.DirIn && s.Data[bs-1] != fillByte {
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

// fillByte is what fillDisk writes.
const fillByte = 0xa7

// fillDisk writes size bytes at LBA 0 (512-byte blocks) through the
// front-end's request queue 0 in 1 MiB WRITE(16)s.
func fillDisk(b *testing.B, dev *frontend.Device, size uint64) {
	data := bytes.Repeat([]byte{fillByte}, 1<<20)
	for off := uint64(0); off < size; off += uint64(len(data)) {
		var cdb [16]byte
		cdb[0] = 0x8a
		binary.BigEndian.PutUint64(cdb[2:], off/512)
		binary.BigEndian.PutUint32(cdb[10:], uint32(len(data)/512))
		r, err := dev.Do(frontend.Command{CDB: cdb[:], DataOut: data})
		if err != nil || r.Response != 0 || r.Status != 0 {
			b.Fatalf("filling the disk at byte %d: %v %+v", off, err, r)
		}
	}
}

func BenchmarkRead4KQD1(b *testing.B)   { benchIO(b, 0x88, 4096, 1) }
func BenchmarkRead4KQD32(b *testing.B)  { benchIO(b, 0x88, 4096, 32) }
func BenchmarkWrite4KQD32(b *testing.B) { benchIO(b, 0x8a, 4096, 32) }

func BenchmarkRead4KQD32Inflight(b *testing.B)  { benchIOWith(b, 0x88, 4096, 32, true) }
func BenchmarkWrite4KQD32Inflight(b *testing.B) { benchIOWith(b, 0x8a, 4096, 32, true) }
