// Goal: with inflight tracking, a back-end that dies at any store of taking, pushing or publishing leaves a
// region from which the next one runs again exactly the requests that were taken and not published, once, in
// the order they were taken, and takes new chains from exactly where the first one stopped; without it nothing
// changes. Method: the virtqtest mock driver with one-descriptor requests carrying an id; the crash points
// (PopCrash, PushCrash, PublishCrash in export_test.go) stop an operation after a given number of its stores;
// a new Queue on the same guest memory and region plays the next process. The spec's recovery cases are
// table tests; a random test crashes at random points over many lifetimes and checks exactly-once.
package virtq_test

import (
	"encoding/binary"
	"math/rand"
	"slices"
	"testing"
	"unsafe"

	"vhost-target/vhost/virtq"
	vt "vhost-target/vhost/virtq/virtqtest"
)

// newRegion returns a zeroed 8-aligned inflight region for one ring of size entries.
func newRegion(size uint16) []byte {
	n := virtq.InflightQueueBytes(size)
	w := make([]uint64, n/8)
	b := unsafe.Slice((*byte)(unsafe.Pointer(&w[0])), n)
	virtq.InitInflight(b, size)
	return b
}

// inflightFlags returns the heads whose inflight flag is set.
func inflightFlags(region []byte, size uint16) []uint16 {
	var hs []uint16
	for h := uint16(0); h < size; h++ {
		if region[16+16*int(h)] == 1 {
			hs = append(hs, h)
		}
	}
	return hs
}

// recovered builds the next process's queue: QEMU sends SET_VRING_BASE = used->idx after a back-end crash.
func recovered(t *testing.T, d *vt.Driver, region []byte) *virtq.Queue {
	t.Helper()
	cfg := d.Config()
	cfg.LastAvail = d.UsedIdx()
	cfg.Inflight = region
	q, err := virtq.New(d.Table, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return q
}

func TestInflightLayout(t *testing.T) {
	// DPDK's get_pervq_shm_size_split and libvhost-user's vu_inflight_queue_size agree on these.
	for _, c := range []struct {
		size uint16
		want uint64
	}{{1, 64}, {2, 64}, {4, 128}, {128, 2112}, {256, 4160}, {32768, 524352}} {
		if got := virtq.InflightQueueBytes(c.size); got != c.want {
			t.Errorf("InflightQueueBytes(%d) = %d, want %d", c.size, got, c.want)
		}
	}
	d := vt.New(8, 1<<12)
	region := newRegion(8)
	cfg := d.Config()
	cfg.Inflight = region
	if _, err := virtq.New(d.Table, cfg); err != nil {
		t.Fatal(err)
	}
	// A new region becomes version 1 with desc_num and used_idx = used->idx.
	if v, n := binary.LittleEndian.Uint16(region[8:]), binary.LittleEndian.Uint16(region[10:]); v != 1 || n != 8 {
		t.Fatalf("version %d desc_num %d", v, n)
	}
	cfg.Inflight = region[:16+16*8-1]
	if _, err := virtq.New(d.Table, cfg); err == nil {
		t.Fatal("a region one byte short was accepted")
	}
	cfg.Inflight = region[4:]
	if _, err := virtq.New(d.Table, cfg); err == nil {
		t.Fatal("a misaligned region was accepted")
	}
}

// TestInflightRecoveryCases crashes a batch of three requests at each store of the spec's publishing steps
// ("When supplying used buffers", steps 1-7) and checks what the next back-end runs again.
func TestInflightRecoveryCases(t *testing.T) {
	// Publish stores for a batch of 3: used->idx, 3 flags, used_idx.
	for stores := -3; stores <= 5; stores++ {
		d := vt.New(8, 1<<12)
		region := newRegion(8)
		cfg := d.Config()
		cfg.Inflight = region
		q, err := virtq.New(d.Table, cfg)
		if err != nil {
			t.Fatal(err)
		}
		var heads []uint16
		for i := range 4 {
			heads = append(heads, d.Add(vt.Desc{Addr: d.Alloc(8, byte(i)), Len: 8}))
		}
		var c virtq.Chain
		for range 4 {
			mustPop(t, q, &c)
		}
		// Heads 2, 0, 3 complete in that order (out of order); head 1 stays in flight.
		done := []uint16{heads[2], heads[0], heads[3]}
		switch {
		case stores < 0:
			// -3: crash after taking, before any push; -2, -1: after one or two pushes (each fully stored).
			for _, h := range done[:stores+3] {
				q.Push(h, 0)
			}
		default:
			for _, h := range done {
				q.Push(h, 0)
			}
			q.PublishCrash(stores)
		}
		published := stores >= 1
		q2 := recovered(t, d, region)
		want := []uint16{heads[0], heads[1], heads[2], heads[3]} // taken order
		if published {
			want = []uint16{heads[1]}
		}
		if got := q2.Resubmits(); !slices.Equal(got, want) {
			t.Errorf("crash at publish store %d: resubmits %v, want %v", stores, got, want)
		}
		// Nothing is skipped or taken twice: the next avail index is where the first back-end stopped.
		if q2.LastAvail() != 4 {
			t.Errorf("crash at publish store %d: next avail %d, want 4", stores, q2.LastAvail())
		}
		if !slices.Equal(inflightFlags(region, 8), want) {
			t.Errorf("crash at publish store %d: flags %v after recovery, want %v", stores, inflightFlags(region, 8), want)
		}
		// The region is consistent again: used_idx = used->idx.
		if u := binary.LittleEndian.Uint16(region[14:]); u != d.UsedIdx() {
			t.Errorf("crash at publish store %d: used_idx %d, used->idx %d", stores, u, d.UsedIdx())
		}
		// The heads run again come first, then nothing (no new chain was made available).
		for _, h := range want {
			mustPop(t, q2, &c)
			if c.Head != h {
				t.Fatalf("crash at publish store %d: resubmitted %d, want %d", stores, c.Head, h)
			}
		}
		mustEmpty(t, q2)
	}
}

// TestInflightTakeCrash crashes between the two stores of taking a head: the head is not marked, so it is
// taken again from the avail ring, not resubmitted: once either way.
func TestInflightTakeCrash(t *testing.T) {
	for stores := 0; stores <= 2; stores++ {
		d := vt.New(8, 1<<12)
		region := newRegion(8)
		cfg := d.Config()
		cfg.Inflight = region
		q, _ := virtq.New(d.Table, cfg)
		h0 := d.Add(vt.Desc{Addr: d.Alloc(8, 0), Len: 8})
		h1 := d.Add(vt.Desc{Addr: d.Alloc(8, 1), Len: 8})
		var c virtq.Chain
		mustPop(t, q, &c)
		if ok, err := q.PopCrash(&c, stores); !ok || err != nil {
			t.Fatal(ok, err)
		}
		q2 := recovered(t, d, region)
		wantResub, wantNext := []uint16{h0}, uint16(1)
		if stores == 2 {
			wantResub, wantNext = []uint16{h0, h1}, 2
		}
		if !slices.Equal(q2.Resubmits(), wantResub) || q2.LastAvail() != wantNext {
			t.Fatalf("crash after %d take stores: resubmits %v next %d, want %v %d", stores, q2.Resubmits(), q2.LastAvail(),
				wantResub, wantNext)
		}
		var got []uint16
		for q2.HasAvail() {
			mustPop(t, q2, &c)
			got = append(got, c.Head)
		}
		if !slices.Equal(got, []uint16{h0, h1}) {
			t.Fatalf("crash after %d take stores: next back-end ran %v", stores, got)
		}
	}
}

// TestInflightStaleRegion: a region whose used_idx is far from used->idx and whose lists point anywhere (not
// this ring's: a hostile front-end) is bounded: indexes are masked, at most a ring's worth of flags is
// cleared, at most a ring's worth of heads is run again, and the ring then fails cleanly (its avail index is
// behind the one recovered), with no fault and no hang.
func TestInflightStaleRegion(t *testing.T) {
	d := vt.New(8, 1<<12)
	region := newRegion(8)
	binary.LittleEndian.PutUint16(region[8:], 1)       // version
	binary.LittleEndian.PutUint16(region[12:], 0xffff) // last_batch_head out of range
	binary.LittleEndian.PutUint16(region[14:], 4000)   // used_idx
	for h := range 8 {
		region[16+16*h] = 1
		binary.LittleEndian.PutUint16(region[16+16*h+6:], 0xfff0) // next out of range
	}
	q := recovered(t, d, region)
	// The batch walk clears 7 (0xffff masked), then 0 (0xfff0 masked) over and over: 1..6 stay.
	if got := q.Resubmits(); !slices.Equal(got, []uint16{1, 2, 3, 4, 5, 6}) || q.LastAvail() != 6 {
		t.Fatalf("resubmits %v next %d", got, q.LastAvail())
	}
	var c virtq.Chain
	for i := 0; ; i++ {
		ok, err := q.Pop(&c)
		if _, isChain := err.(*virtq.ChainError); isChain {
			continue // zeroed descriptors: malformed chains, completed with length 0 by the caller
		}
		if err != nil {
			break // ErrAvailAhead: the avail index is behind what the region says was taken
		}
		if !ok || i > 20 {
			t.Fatalf("Pop %d = %v, %v", i, ok, err)
		}
	}
}

// TestInflightRandomCrashes runs random traffic over many back-end lifetimes, each ending at a random store
// of a random operation, and checks that every request is published exactly once, that a back-end runs a
// request again only if no earlier one published it, and at most once per lifetime.
func TestInflightRandomCrashes(t *testing.T) {
	seeds := 300
	if testing.Short() {
		seeds = 60
	}
	crashes, resubmitted := 0, 0
	for seed := range seeds {
		c, r := inflightRandom(t, int64(seed))
		crashes, resubmitted = crashes+c, resubmitted+r
	}
	// The test is only as good as the crashes it makes: most lifetimes end in one, many with work in flight.
	if crashes < seeds*3 || resubmitted < seeds {
		t.Fatalf("%d crashes, %d requests run again over %d seeds", crashes, resubmitted, seeds)
	}
	t.Logf("%d crashes, %d requests run again", crashes, resubmitted)
}

func inflightRandom(t *testing.T, seed int64) (crashes, resubmitted int) {
	rng := rand.New(rand.NewSource(seed))
	const size = 8
	d := vt.New(size, 1<<14)
	region := newRegion(size)
	buf := make([]uint64, size) // GPA of each head's 8-byte request (it holds the request id)
	for h := range buf {
		buf[h] = d.Alloc(8, 0)
	}
	var (
		nextID    uint64 = 1
		freeHeads []uint16
		headID    = map[uint16]uint64{} // head → id of the request the driver made available on it
		published = map[uint64]bool{}
		exposed   = 0
	)
	for h := uint16(0); h < size; h++ {
		freeHeads = append(freeHeads, h)
	}
	expose := func() {
		for len(freeHeads) > 0 && rng.Intn(3) > 0 {
			h := freeHeads[0]
			freeHeads = freeHeads[1:]
			binary.LittleEndian.PutUint64(d.Bytes(buf[h], 8), nextID)
			headID[h] = nextID
			nextID++
			exposed++
			d.SetDesc(h, vt.Desc{Addr: buf[h], Len: 8})
			d.Expose(h)
		}
	}
	reap := func() {
		for _, u := range d.PopUsed() {
			id, ok := headID[uint16(u.ID)]
			if !ok || published[id] {
				t.Fatalf("seed %d: head %d published twice (request %d)", seed, u.ID, id)
			}
			published[id] = true
			delete(headID, uint16(u.ID))
			freeHeads = append(freeHeads, uint16(u.ID))
		}
	}
	cfg := d.Config()
	cfg.Inflight = region
	q, err := virtq.New(d.Table, cfg)
	if err != nil {
		t.Fatal(err)
	}
	for life := 0; life < 8; life++ {
		ranHere := map[uint64]bool{}
		var taken []uint16 // popped, not pushed
		pending := 0
		crashAt := rng.Intn(40)
		if life == 7 {
			crashAt = -1 // the last back-end lives: it drains everything
		}
		var c virtq.Chain
		run := func(head uint16) {
			id := binary.LittleEndian.Uint64(d.Bytes(buf[head], 8))
			if published[id] {
				t.Fatalf("seed %d life %d: request %d run again after it was published", seed, life, id)
			}
			if ranHere[id] {
				t.Fatalf("seed %d life %d: request %d run twice by one back-end", seed, life, id)
			}
			ranHere[id] = true
			taken = append(taken, head)
		}
		for step := 0; ; step++ {
			expose()
			crash := step == crashAt
			switch op := rng.Intn(3); {
			case op == 0 && q.HasAvail():
				if crash && q.ResubmitsLeft() == 0 {
					if ok, err := q.PopCrash(&c, rng.Intn(3)); err != nil || !ok {
						t.Fatal(ok, err)
					}
					run(c.Head)
					goto crashed
				}
				if ok, err := q.Pop(&c); err != nil || !ok {
					t.Fatal(ok, err)
				}
				run(c.Head)
			case op == 1 && len(taken) > 0:
				i := rng.Intn(len(taken))
				h := taken[i]
				taken = slices.Delete(taken, i, i+1)
				if crash {
					q.PushCrash(h, 0, rng.Intn(3))
					goto crashed
				}
				q.Push(h, 0)
				pending++
			case op == 2 && pending > 0:
				if crash {
					q.PublishCrash(rng.Intn(pending + 3))
					goto crashed
				}
				q.Publish()
				pending = 0
				reap()
			default:
				if crash {
					goto crashed
				}
			}
			if step > 200 {
				break
			}
		}
		// The last lifetime drains everything.
		for q.HasAvail() || len(taken) > 0 {
			for q.HasAvail() {
				if ok, err := q.Pop(&c); err != nil || !ok {
					t.Fatal(ok, err)
				}
				run(c.Head)
			}
			for _, h := range taken {
				q.Push(h, 0)
			}
			taken = taken[:0]
			q.Publish()
			reap()
		}
		break
	crashed:
		reap() // what the driver can see of the dead back-end's work
		q = recovered(t, d, region)
		crashes++
		resubmitted += len(q.Resubmits())
	}
	if len(published) != exposed {
		t.Fatalf("seed %d: %d requests made available, %d published", seed, exposed, len(published))
	}
	return crashes, resubmitted
}
