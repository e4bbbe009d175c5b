package reactor

import (
	"sync"
	"testing"
)

func TestRingFIFOAndFull(t *testing.T) {
	r := NewRing[int](4)
	for i := 0; i < 4; i++ {
		if !r.Push(i) {
			t.Fatalf("push %d refused", i)
		}
	}
	if r.Push(9) {
		t.Fatal("push into a full ring succeeded")
	}
	for i := 0; i < 4; i++ {
		v, ok := r.Pop()
		if !ok || v != i {
			t.Fatalf("pop %d: got %d %v", i, v, ok)
		}
	}
	if _, ok := r.Pop(); ok {
		t.Fatal("pop from an empty ring succeeded")
	}
}

// TestRingManyProducers pushes from many goroutines while one consumer pops:
// every value arrives exactly once and each producer's values stay in order.
func TestRingManyProducers(t *testing.T) {
	const producers, per = 8, 5000
	r := NewRing[uint64](64)
	var wg sync.WaitGroup
	for p := 0; p < producers; p++ {
		wg.Add(1)
		go func(p uint64) {
			defer wg.Done()
			for i := uint64(0); i < per; i++ {
				for !r.Push(p<<32 | i) {
				}
			}
		}(uint64(p))
	}
	next := make([]uint64, producers)
	for got := 0; got < producers*per; {
		v, ok := r.Pop()
		if !ok {
			continue
		}
		p, i := v>>32, v&0xffffffff
		if i != next[p] {
			t.Fatalf("producer %d: got %d, want %d (lost or duplicated)", p, i, next[p])
		}
		next[p]++
		got++
	}
	wg.Wait()
	if _, ok := r.Pop(); ok {
		t.Fatal("extra element after all were consumed")
	}
}

func TestSPSC(t *testing.T) {
	const n = 100000
	r := NewSPSC[int](16)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < n; i++ {
			for !r.Push(i) {
			}
		}
	}()
	for want := 0; want < n; {
		v, ok := r.Pop()
		if !ok {
			continue
		}
		if v != want {
			t.Fatalf("got %d want %d", v, want)
		}
		want++
	}
	<-done
}

func TestRingNoAllocs(t *testing.T) {
	r := NewRing[int](8)
	if a := testing.AllocsPerRun(1000, func() { r.Push(1); r.Pop() }); a != 0 {
		t.Fatalf("%v allocs per push/pop", a)
	}
}

func BenchmarkRingPushPop(b *testing.B) {
	r := NewRing[int](1024)
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		r.Push(i)
		r.Pop()
	}
}
