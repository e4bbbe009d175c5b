// Goal: no descriptor table, avail ring or indirect table a driver can write makes Pop panic, hang, or hand out
// a segment outside guest memory. Method: FuzzPop lays fuzz bytes over a fixed memory layout and drains the
// ring, checking each chain's invariants. Seeds (testdata/fuzz/FuzzPop) are valid and broken rings written by
// TestWriteFuzzSeeds (run with VIRTQ_WRITE_SEEDS=1 to regenerate).
package virtq_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"unsafe"

	"vhost-target/vhost/guestmem"
	"vhost-target/vhost/virtq"
)

// Fuzz memory layout. Region 0: GPA 0, 64 KiB, rings by UVA fzUVA0. Region 1: GPA-adjacent 4 KiB.
const (
	fzRegion0   = 0x10000
	fzRegion1   = 0x1000
	fzUVA0      = 0x1_0000_0000
	fzUVA1      = 0x2_0000_0000
	fzTablesGPA = 0x3000 // the "tables" input lands here (indirect tables)
	fzUsedGPA   = 0x6000
	fzDataGPA   = 0x8000 // data buffers in seeds
)

// cfg bits: size = 1<<(cfg&7); 8 = EVENT_IDX; 16 = INDIRECT_DESC.
func fuzzConfig(cfg, lastAvail uint16) virtq.Config {
	size := uint32(1) << (cfg & 7)
	return virtq.Config{Size: size, DescUVA: fzUVA0, AvailUVA: fzUVA0 + 16*uint64(size), UsedUVA: fzUVA0 + fzUsedGPA,
		LastAvail: lastAvail, EventIdx: cfg&8 != 0, Indirect: cfg&16 != 0}
}

var chainErrors = []error{virtq.ErrDescIndex, virtq.ErrChainLoop, virtq.ErrIndirectNotNegotiated,
	virtq.ErrIndirectLen, virtq.ErrNestedIndirect, virtq.ErrIndirectNext, virtq.ErrIndirectUnmapped,
	virtq.ErrReadAfterWrite, virtq.ErrZeroLength, virtq.ErrBufferUnmapped, virtq.ErrChainBytes,
	virtq.ErrTooManySegments}

func inside(s, mem []byte) bool {
	p, lo := uintptr(unsafe.Pointer(unsafe.SliceData(s))), uintptr(unsafe.Pointer(unsafe.SliceData(mem)))
	return p >= lo && p+uintptr(len(s)) <= lo+uintptr(len(mem)) && cap(s) == len(s)
}

// fuzzMem is the fuzz target's guest memory: two GPA-adjacent regions.
type fuzzMem struct {
	tb         *guestmem.Table
	mem0, mem1 []byte
}

func newFuzzMem(t testing.TB) *fuzzMem {
	m := &fuzzMem{mem0: make([]byte, fzRegion0), mem1: make([]byte, fzRegion1)}
	var err error
	m.tb, err = guestmem.FromBytes([]guestmem.Region{
		{GPA: 0, Size: fzRegion0, UVA: fzUVA0},
		{GPA: fzRegion0, Size: fzRegion1, UVA: fzUVA1},
	}, [][]byte{m.mem0, m.mem1})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// drain lays the input over memory, pops until empty or broken (completing every head), checks every chain's
// invariants, and returns the number of good chains and the errors seen.
func (m *fuzzMem) drain(t testing.TB, cfg, lastAvail uint16, ring, tables []byte) (chains int, errs []error) {
	clear(m.mem0)
	copy(m.mem0[:fzTablesGPA], ring)
	copy(m.mem0[fzTablesGPA:fzUsedGPA], tables)
	c := fuzzConfig(cfg, lastAvail)
	q, err := virtq.New(m.tb, c)
	if err != nil {
		t.Fatalf("New: %v", err) // the layout is valid for every cfg
	}
	var ch virtq.Chain
	for i := 0; i <= int(c.Size)+1; i++ {
		if i%3 == 1 {
			q.SetNotification(i%2 == 0)
		}
		ok, err := q.Pop(&ch)
		if err != nil {
			errs = append(errs, err)
			var ce *virtq.ChainError
			if errors.As(err, &ce) {
				known := false
				for _, e := range chainErrors {
					known = known || errors.Is(err, e)
				}
				if !known || ce.Head >= uint16(c.Size) {
					t.Fatalf("unexpected chain error %v", err)
				}
				q.Push(ce.Head, 0)
				continue
			}
			if !errors.Is(err, virtq.ErrAvailAhead) && !errors.Is(err, virtq.ErrHeadIndex) {
				t.Fatalf("unexpected ring error %v", err)
			}
			if !q.HasAvail() {
				t.Fatal("broken ring but HasAvail false")
			}
			break
		}
		if !ok {
			break
		}
		chains++
		if ch.Head >= uint16(c.Size) || ch.NDesc == 0 || ch.NRead+ch.NWrite > virtq.MaxSegments ||
			ch.NRead < 0 || ch.NWrite < 0 {
			t.Fatalf("bad chain %+v", ch)
		}
		var rl, wl uint64
		for j, s := range ch.Segs[:ch.NRead+ch.NWrite] {
			if len(s) == 0 || !(inside(s, m.mem0) || inside(s, m.mem1)) {
				t.Fatalf("segment %d (len %d) outside guest memory", j, len(s))
			}
			if j < ch.NRead {
				rl += uint64(len(s))
			} else {
				wl += uint64(len(s))
			}
		}
		if rl != uint64(ch.ReadLen) || wl != uint64(ch.WriteLen) || rl+wl > 1<<32-1 {
			t.Fatalf("lengths %d/%d, chain says %d/%d", rl, wl, ch.ReadLen, ch.WriteLen)
		}
		q.Push(ch.Head, ch.WriteLen)
		if i%2 == 0 {
			q.Publish()
		}
	}
	q.Publish()
	if n := q.LastAvail() - lastAvail; n > uint16(c.Size) {
		t.Fatalf("consumed %d entries of a ring of %d", n, c.Size)
	}
	return chains, errs
}

func FuzzPop(f *testing.F) {
	f.Add(uint16(3), uint16(0), []byte{}, []byte{})
	m := newFuzzMem(f)
	f.Fuzz(func(t *testing.T, cfg, lastAvail uint16, ring, tables []byte) {
		m.drain(t, cfg, lastAvail, ring, tables)
	})
}

// TestFuzzSeeds checks that each seed is the scenario its name says, so the corpus starts the fuzzer on
// both sides of every check.
func TestFuzzSeeds(t *testing.T) {
	want := map[string]struct {
		chains int
		err    error
	}{
		"direct":                  {1, nil},
		"three-chains-eventidx":   {3, nil},
		"indirect":                {1, nil},
		"direct-then-indirect":    {1, nil},
		"split-across-regions":    {1, nil},
		"wrap":                    {2, nil},
		"loop":                    {0, virtq.ErrChainLoop},
		"avail-ahead":             {0, virtq.ErrAvailAhead},
		"nested-indirect":         {0, virtq.ErrNestedIndirect},
		"event-idx-indirect-long": {0, virtq.ErrTooManySegments},
	}
	m := newFuzzMem(t)
	seeds := fuzzSeeds()
	if len(seeds) != len(want) {
		t.Fatalf("%d seeds, %d expectations", len(seeds), len(want))
	}
	for name, s := range seeds {
		chains, errs := m.drain(t, s.cfg, s.lastAvail, s.ring, s.tables)
		w := want[name]
		if chains != w.chains || (w.err == nil) != (len(errs) == 0) || (w.err != nil && !errors.Is(errs[0], w.err)) {
			t.Errorf("seed %s: %d chains, errors %v; want %d, %v", name, chains, errs, w.chains, w.err)
		}
	}
}

// seedRing builds fuzz inputs: descriptors at desc[i], avail entries and idx.
type seedRing struct {
	cfg, lastAvail uint16
	ring, tables   []byte
}

func newSeed(cfg, lastAvail uint16) *seedRing {
	return &seedRing{cfg: cfg, lastAvail: lastAvail, ring: make([]byte, 16*(1<<(cfg&7))+6+2*(1<<(cfg&7))),
		tables: nil}
}

func (s *seedRing) desc(i int, addr uint64, n uint32, flags, next uint16) *seedRing {
	b := s.ring[16*i:]
	binary.LittleEndian.PutUint64(b, addr)
	binary.LittleEndian.PutUint32(b[8:], n)
	binary.LittleEndian.PutUint16(b[12:], flags)
	binary.LittleEndian.PutUint16(b[14:], next)
	return s
}

// table writes indirect descriptor i at fzTablesGPA + 16*i.
func (s *seedRing) table(i int, addr uint64, n uint32, flags, next uint16) *seedRing {
	if need := 16 * (i + 1); len(s.tables) < need {
		s.tables = append(s.tables, make([]byte, need-len(s.tables))...)
	}
	b := s.tables[16*i:]
	binary.LittleEndian.PutUint64(b, addr)
	binary.LittleEndian.PutUint32(b[8:], n)
	binary.LittleEndian.PutUint16(b[12:], flags)
	binary.LittleEndian.PutUint16(b[14:], next)
	return s
}

// avail sets avail->idx and the ring entries for idx lastAvail.. with heads.
func (s *seedRing) avail(idx uint16, heads ...uint16) *seedRing {
	size := 1 << (s.cfg & 7)
	a := s.ring[16*size:]
	binary.LittleEndian.PutUint16(a[2:], idx)
	for i, h := range heads {
		slot := int(s.lastAvail+uint16(i)) % size
		binary.LittleEndian.PutUint16(a[4+2*slot:], h)
	}
	return s
}

func fuzzSeeds() map[string]*seedRing {
	const w, n, ind = 2, 1, 4
	return map[string]*seedRing{
		"direct": newSeed(3, 0).desc(0, fzDataGPA, 51, n, 1).desc(1, fzDataGPA+0x100, 96, w, 0).avail(1, 0),
		"three-chains-eventidx": newSeed(2|8, 0).
			desc(0, fzDataGPA, 16, 0, 0).desc(1, fzDataGPA+16, 32, n, 2).desc(2, fzDataGPA+64, 8, w, 0).
			desc(3, fzDataGPA+128, 512, w, 0).avail(3, 0, 1, 3),
		"indirect": newSeed(4|16, 0).desc(0, fzTablesGPA, 48, ind, 0).
			table(0, fzDataGPA, 51, n, 1).table(1, fzDataGPA+64, 4096, n, 2).table(2, fzDataGPA+0x2000, 108, w, 0).
			avail(1, 0),
		"direct-then-indirect": newSeed(4|16, 0).desc(0, fzDataGPA, 51, n, 5).desc(5, fzTablesGPA, 32, ind|w, 0).
			table(0, fzDataGPA+64, 512, n, 1).table(1, fzDataGPA+0x1000, 108, w, 0).avail(1, 0),
		"split-across-regions": newSeed(3, 0).desc(0, fzRegion0-8, 24, n, 1).desc(1, fzDataGPA, 8, w, 0).avail(1, 0),
		"wrap":                 newSeed(1, 65535).desc(0, fzDataGPA, 1, 0, 0).desc(1, fzDataGPA+8, 1, w, 0).avail(1, 0, 1),
		"loop":                 newSeed(3, 0).desc(0, fzDataGPA, 1, n, 1).desc(1, fzDataGPA, 1, n, 0).avail(1, 0),
		"avail-ahead":          newSeed(3, 0).avail(9),
		"nested-indirect": newSeed(3|16, 0).desc(0, fzTablesGPA, 16, ind, 0).table(0, fzTablesGPA, 16, ind, 0).
			avail(1, 0),
		"event-idx-indirect-long": func() *seedRing {
			s := newSeed(7|8|16, 0).desc(0, fzTablesGPA, 16*140, ind, 0)
			for i := range 140 {
				s.table(i, fzDataGPA+uint64(i)*8, 8, n, uint16(i+1))
			}
			s.table(139, fzDataGPA, 8, w, 0)
			return s.avail(1, 0)
		}(),
	}
}

// TestWriteFuzzSeeds writes the seed corpus when VIRTQ_WRITE_SEEDS=1, and otherwise checks that every seed
// still parses as a ring the fuzz body accepts (each seed also runs as part of FuzzPop in plain go test).
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("VIRTQ_WRITE_SEEDS") == "" {
		t.Skip("set VIRTQ_WRITE_SEEDS=1 to regenerate testdata/fuzz/FuzzPop")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzPop")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, s := range fuzzSeeds() {
		body := fmt.Sprintf("go test fuzz v1\nuint16(%d)\nuint16(%d)\n[]byte(%s)\n[]byte(%s)\n",
			s.cfg, s.lastAvail, strconv.Quote(string(s.ring)), strconv.Quote(string(s.tables)))
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
