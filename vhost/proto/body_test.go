package proto_test

import (
	"encoding/binary"
	"testing"

	"vhost-target/vhost/proto"
)

func TestLogRoundTrip(t *testing.T) {
	l := proto.Log{MmapSize: 1 << 20, MmapOffset: 4096}
	got, err := proto.DecodeLog(&proto.Msg{Header: proto.Header{Request: proto.SetLogBase}, Payload: l.Encode()})
	if err != nil || got != l {
		t.Fatalf("%+v %v, want %+v", got, err, l)
	}
}

// TestBodySize checks BodySize against the decoders: a payload of exactly
// the body size decodes, one byte less does not.
func TestBodySize(t *testing.T) {
	decode := map[proto.Request]func(*proto.Msg) error{
		proto.SetFeatures:    func(m *proto.Msg) error { _, err := proto.U64(m); return err },
		proto.SetVringCall:   func(m *proto.Msg) error { _, err := proto.U64(m); return err },
		proto.SetVringEnable: func(m *proto.Msg) error { _, err := proto.DecodeVringState(m); return err },
		proto.GetVringBase:   func(m *proto.Msg) error { _, err := proto.DecodeVringState(m); return err },
		proto.SetVringAddr:   func(m *proto.Msg) error { _, err := proto.DecodeVringAddr(m); return err },
		proto.AddMemReg:      func(m *proto.Msg) error { _, err := proto.DecodeSingleRegion(m); return err },
		proto.SetLogBase:     func(m *proto.Msg) error { _, err := proto.DecodeLog(m); return err },
	}
	for req, dec := range decode {
		n, ok := proto.BodySize(&proto.Msg{Header: proto.Header{Request: req}})
		if !ok || n == 0 {
			t.Fatalf("%v: body size %d %v", req, n, ok)
		}
		if err := dec(&proto.Msg{Header: proto.Header{Request: req}, Payload: make([]byte, n)}); err != nil {
			t.Errorf("%v: %d bytes: %v", req, n, err)
		}
		if err := dec(&proto.Msg{Header: proto.Header{Request: req}, Payload: make([]byte, n-1)}); err == nil {
			t.Errorf("%v: %d bytes decoded", req, n-1)
		}
	}
	for _, req := range []proto.Request{proto.GetFeatures, proto.SetOwner, proto.ResetDevice, proto.GetQueueNum} {
		if n, ok := proto.BodySize(&proto.Msg{Header: proto.Header{Request: req}, Payload: make([]byte, 8)}); n != 0 || !ok {
			t.Errorf("%v: body size %d %v", req, n, ok)
		}
	}
	for _, req := range []proto.Request{proto.GetConfig, proto.SetConfig, 99} {
		if _, ok := proto.BodySize(&proto.Msg{Header: proto.Header{Request: req}}); ok {
			t.Errorf("%v has a fixed body size", req)
		}
	}
	table := func(nregions uint32, size int) *proto.Msg {
		p := make([]byte, size)
		if size >= 4 {
			binary.LittleEndian.PutUint32(p, nregions)
		}
		return &proto.Msg{Header: proto.Header{Request: proto.SetMemTable}, Payload: p}
	}
	for _, c := range []struct {
		n    uint32
		size int
		want int
		ok   bool
	}{{0, 8, 8, true}, {2, 8 + 8*32, 72, true}, {8, 300, 264, true}, {9, 300, 0, false}, {1, 4, 0, false}} {
		if n, ok := proto.BodySize(table(c.n, c.size)); n != c.want || ok != c.ok {
			t.Errorf("SET_MEM_TABLE of %d regions in %d bytes: body %d %v, want %d %v", c.n, c.size, n, ok, c.want, c.ok)
		}
	}
	// GET/SET_INFLIGHT_FD: QEMU's 24 bytes, or the 20 bytes of fields; nothing between.
	for _, req := range []proto.Request{proto.GetInflightFD, proto.SetInflightFD} {
		if n, ok := proto.BodySize(&proto.Msg{Header: proto.Header{Request: req}}); n != proto.InflightWireSize || !ok {
			t.Errorf("%v: body size %d %v", req, n, ok)
		}
		for size := 0; size <= 32; size++ {
			_, err := proto.DecodeInflight(&proto.Msg{Header: proto.Header{Request: req}, Payload: make([]byte, size)})
			if want := size == 20 || size == 24; (err == nil) != want {
				t.Errorf("%v of %d bytes: %v", req, size, err)
			}
		}
	}
	// A table of 0 regions without fds decodes to no regions.
	if regs, err := proto.DecodeMemTable(table(0, 8)); err != nil || len(regs) != 0 {
		t.Errorf("empty memory table: %v %v", regs, err)
	}
}
