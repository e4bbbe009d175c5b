// Tests for the malloc bdev. Goal: every hugepages mode that this machine
// can serve gives a disk whose whole memory is populated at creation (the
// kernel counts it as private anonymous or hugetlb memory, so no read maps
// the zero page), of the backing it claims and logs, that reads back what was
// written without allocating; modes that cannot be served fail with an error
// naming the bdev and the key, and "auto" falls back. Method: create disks of
// a size that is not a multiple of 2 MiB, then read /proc/self/smaps for the
// mapping; the hugetlb pool and the THP setting are replaced to play hosts
// without them. The hugetlb case reserves 2 MiB pages through
// /proc/sys/vm/nr_hugepages when the pool is short and the test runs as root
// (and gives them back), and is skipped otherwise.
package malloc

import (
	"bytes"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"vhost-target/bdev"
)

// oddSize is not a multiple of 2 MiB: the mapping must be rounded up.
const oddSize = 3<<20 + 4096

type waiter struct{ n int }

func (w *waiter) IODone(*bdev.IO) { w.n++ }

// create makes a disk, closed when the test ends, and returns its log.
func create(t *testing.T, mode string, size uint64) (*Disk, string, error) {
	t.Helper()
	var logs bytes.Buffer
	d, err := Create(Config{Name: "m-" + mode, Size: size, BlockSize: 512, UUID: [16]byte{1}, Hugepages: mode,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err == nil {
		t.Cleanup(func() { d.Close() })
	}
	return d, logs.String(), err
}

// needHugetlb makes sure the 2 MiB pool has pages free pages, reserving them
// as root if it must, or skips the test.
func needHugetlb(t *testing.T, pages uint64) {
	t.Helper()
	pool, err := readHugetlbPool()
	if err != nil {
		t.Fatal(err)
	}
	if pool.available() >= pages {
		return
	}
	if os.Geteuid() != 0 {
		t.Skipf("the 2 MiB hugetlb pool has %d pages available (%v), %d needed, and only root can reserve more",
			pool.available(), pool, pages)
	}
	const knob = "/proc/sys/vm/nr_hugepages"
	data, err := os.ReadFile(knob)
	if err != nil {
		t.Skipf("cannot read %s: %v", knob, err)
	}
	orig := strings.TrimSpace(string(data))
	n, err := strconv.ParseUint(orig, 10, 64)
	if err != nil {
		t.Fatalf("%s: %q", knob, orig)
	}
	want := n + pages - pool.available()
	if err := os.WriteFile(knob, []byte(strconv.FormatUint(want, 10)), 0); err != nil {
		t.Skipf("cannot reserve hugepages: write %d to %s: %v", want, knob, err)
	}
	t.Cleanup(func() {
		// Runs after the test's disks are closed (cleanups run last-in
		// first-out), so the pages given back are free.
		if err := os.WriteFile(knob, []byte(orig), 0); err != nil {
			t.Errorf("restoring %s to %s: %v", knob, orig, err)
		}
	})
	if pool, _ = readHugetlbPool(); pool.available() < pages {
		t.Skipf("asked the kernel for %d hugepages in all; it has %d available (%v): memory too fragmented",
			want, pool.available(), pool)
	}
	t.Logf("reserved 2 MiB hugepages for the test: %s %s -> %d", knob, orig, want)
}

func thpEnabled() bool { s := readTHPSetting(); return s != "never" && s != "" }

// TestModes creates a disk in each mode this machine can serve and checks
// its backing, that the memory is populated, the log line and I/O.
func TestModes(t *testing.T) {
	type mode struct {
		mode, backing string
		skip          string // why this machine cannot run it
		hugetlb       bool   // reserve pool pages first
	}
	modes := []mode{
		{mode: HugepagesNone, backing: Backing4K},
		{mode: HugepagesTHP, backing: BackingTHP},
		{mode: HugepagesHugeTLB, backing: BackingHugeTLB, hugetlb: true},
		{mode: HugepagesAuto, backing: BackingHugeTLB, hugetlb: true},
		{mode: HugepagesAuto, backing: BackingTHP},
		{mode: "", backing: BackingTHP},
	}
	if !thpEnabled() {
		modes[1].skip = "transparent huge pages are disabled here"
		modes[4].backing, modes[5].backing = Backing4K, Backing4K
	}
	for _, m := range modes {
		t.Run(m.mode+"-"+m.backing, func(t *testing.T) {
			if m.skip != "" {
				t.Skip(m.skip)
			}
			pages := uint64(oddSize+hugePageBytes-1) / hugePageBytes
			switch {
			case m.hugetlb:
				needHugetlb(t, pages)
			case m.mode == HugepagesAuto || m.mode == "":
				// Play a host without free hugepages, so auto falls back.
				saved := readHugetlbPool
				t.Cleanup(func() { readHugetlbPool = saved })
				readHugetlbPool = func() (hugetlbCounts, error) { return hugetlbCounts{total: 4}, nil }
			}
			d, logs, err := create(t, m.mode, oddSize)
			if err != nil {
				t.Fatal(err)
			}
			checkDisk(t, d, m.backing)
			for _, want := range []string{"level=INFO", "bdev=m-" + m.mode, "backing=" + m.backing, "size=" + strconv.Itoa(oddSize),
				"populate="} {
				if !strings.Contains(logs, want) {
					t.Errorf("log %q lacks %q", logs, want)
				}
			}
			if (m.mode == HugepagesAuto || m.mode == "") && m.backing != BackingHugeTLB && !strings.Contains(logs, "no_hugetlb=") {
				t.Errorf("auto fell back without saying why: %q", logs)
			}
		})
	}
}

// checkDisk checks size, backing, population (from smaps), zeroes and a
// write read back at the last block.
func checkDisk(t *testing.T, d *Disk, backing string) {
	t.Helper()
	if d.Backing() != backing {
		t.Fatalf("backing %q, want %q", d.Backing(), backing)
	}
	if len(d.Bytes()) != oddSize || d.Info().NumBlocks != oddSize/512 {
		t.Fatalf("%d bytes, %d blocks", len(d.Bytes()), d.Info().NumBlocks)
	}
	page := uint64(os.Getpagesize())
	if backing != Backing4K {
		page = hugePageBytes
	}
	if l := uint64(len(d.mapping)); l%page != 0 || l < oddSize || l-oddSize >= page {
		t.Fatalf("mapping of %d bytes for %d with %d-byte pages", l, oddSize, page)
	}
	v, err := smapsOf(d.mapping)
	if err != nil {
		t.Fatal(err)
	}
	mapped := uint64(len(d.mapping))
	switch backing {
	case BackingHugeTLB:
		if v.privateHugetlb < mapped || d.HugeBytes() != mapped {
			t.Errorf("hugetlb: %d bytes of private hugetlb pages, HugeBytes %d; want %d", v.privateHugetlb, d.HugeBytes(), mapped)
		}
	case BackingTHP:
		if uintptr(unsafe.Pointer(&d.mapping[0]))%hugePageBytes != 0 {
			t.Errorf("thp: mapping at %p is not 2 MiB aligned", &d.mapping[0])
		}
		if !slices.Contains(v.flags, "hg") {
			t.Errorf("thp: mapping lacks the hg (MADV_HUGEPAGE) flag: %v", v.flags)
		}
		if v.anonymous < mapped {
			t.Errorf("thp: %d of %d bytes populated", v.anonymous, mapped)
		}
		if d.HugeBytes() == 0 {
			t.Logf("the kernel gave no transparent huge pages (fragmented memory?); %v", v.flags)
		}
	case Backing4K:
		if v.anonymous < mapped || d.HugeBytes() != 0 {
			t.Errorf("4k: %d of %d bytes populated, HugeBytes %d", v.anonymous, mapped, d.HugeBytes())
		}
		if readTHPSetting() != "" && !slices.Contains(v.flags, "nh") {
			t.Errorf("4k: mapping lacks the nh (MADV_NOHUGEPAGE) flag: %v", v.flags)
		}
	}
	if i := slices.IndexFunc(d.Bytes(), func(b byte) bool { return b != 0 }); i >= 0 {
		t.Fatalf("byte %d of a new disk is %d", i, d.Bytes()[i])
	}
	ch, _ := d.Open()
	var w waiter
	buf := []byte(strings.Repeat("x", 512))
	io := &bdev.IO{Op: bdev.OpWrite, Offset: oddSize - 512, Len: 512, Iov: [][]byte{buf}, Done: &w}
	ch.Submit(io)
	got := make([]byte, 512)
	rd := &bdev.IO{Op: bdev.OpRead, Offset: oddSize - 512, Len: 512, Iov: [][]byte{got}, Done: &w}
	ch.Submit(rd)
	if w.n != 2 || io.Err != nil || rd.Err != nil || !bytes.Equal(got, buf) {
		t.Fatalf("write/read back: %d done, %v, %v, %q", w.n, io.Err, rd.Err, got[:8])
	}
	past := &bdev.IO{Op: bdev.OpRead, Offset: oddSize, Len: 512, Iov: [][]byte{got}, Done: &w}
	if ch.Submit(past); past.Err != bdev.ErrRange {
		t.Errorf("read past the end (into the rounded-up mapping): %v", past.Err)
	}
}

// TestHugeTLBShort plays a host whose 2 MiB pool is short: "hugetlb"
// fails naming the bdev, the key and the counts; "auto" falls back.
func TestHugeTLBShort(t *testing.T) {
	saved := readHugetlbPool
	defer func() { readHugetlbPool = saved }()
	readHugetlbPool = func() (hugetlbCounts, error) {
		return hugetlbCounts{total: 8, free: 3, reserved: 2}, nil
	}
	_, _, err := create(t, HugepagesHugeTLB, oddSize)
	for _, want := range []string{`malloc bdev "m-hugetlb"`, `hugepages = "hugetlb"`, "needs 2 free 2 MiB hugepages, 1 available",
		"vm.nr_hugepages"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v lacks %q", err, want)
		}
	}
	d, logs, err := create(t, HugepagesAuto, oddSize)
	if err != nil {
		t.Fatal(err)
	}
	if d.Backing() == BackingHugeTLB || !strings.Contains(logs, "needs 2 free 2 MiB hugepages, 1 available") {
		t.Errorf("auto on a short pool: backing %s, log %q", d.Backing(), logs)
	}
}

// TestTHPDisabled plays a host with THP "never" (and no hugepages):
// "thp" fails naming the bdev and key; "auto" gets 4 KiB pages.
func TestTHPDisabled(t *testing.T) {
	savedPool, savedTHP := readHugetlbPool, readTHPSetting
	defer func() { readHugetlbPool, readTHPSetting = savedPool, savedTHP }()
	readHugetlbPool = func() (hugetlbCounts, error) { return hugetlbCounts{}, nil }
	readTHPSetting = func() string { return "never" }
	_, _, err := create(t, HugepagesTHP, oddSize)
	for _, want := range []string{`malloc bdev "m-thp"`, `hugepages = "thp"`, `enabled is "never"`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v lacks %q", err, want)
		}
	}
	d, _, err := create(t, HugepagesAuto, oddSize)
	if err != nil {
		t.Fatal(err)
	}
	checkDisk(t, d, Backing4K)
}

func TestBadConfig(t *testing.T) {
	for _, c := range []struct {
		cfg  Config
		want string
	}{
		{Config{Name: "b", Size: 4096, BlockSize: 1024}, `malloc bdev "b": block size 1024 is not 512 or 4096`},
		{Config{Name: "b", Size: 0, BlockSize: 512}, `malloc bdev "b": size 0 is not a positive multiple of 512`},
		{Config{Name: "b", Size: 4096 + 512, BlockSize: 4096}, `malloc bdev "b": size 4608 is not a positive multiple of 4096`},
		{Config{Name: "b", Size: 4096, BlockSize: 512, Hugepages: "1g"}, `malloc bdev "b": hugepages "1g" is not "auto"`},
	} {
		if _, err := Create(c.cfg); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: error %v, want %q", c.cfg, err, c.want)
		}
	}
}

// TestNoAllocs: reads and writes through a channel allocate nothing.
func TestNoAllocs(t *testing.T) {
	d, _, err := create(t, HugepagesAuto, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	ch, _ := d.Open()
	var w waiter
	buf := make([]byte, 8192)
	iov := [][]byte{buf[:4096], buf[4096:]}
	rd := &bdev.IO{Op: bdev.OpRead, Offset: 65536, Len: 8192, Iov: iov, Done: &w}
	wr := &bdev.IO{Op: bdev.OpWrite, Offset: 131072, Len: 8192, Iov: iov, Done: &w}
	if n := testing.AllocsPerRun(1000, func() { ch.Submit(wr); ch.Submit(rd) }); n != 0 {
		t.Errorf("Submit allocates %v per read+write", n)
	}
	if rd.Err != nil || wr.Err != nil {
		t.Fatal(rd.Err, wr.Err)
	}
}
