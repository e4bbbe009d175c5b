// Goal: no byte sequence a front-end sends makes the wire decoders panic or
// disagree with the encoders. Method: FuzzProto decodes fuzz bytes as the
// payload of the message that the first byte names, with every decoder
// (DecodeMemTable, DecodeVringAddr, DecodeVringState, DecodeConfig,
// DecodeSingleRegion, U64); whatever decodes must re-encode to the same bytes.
// The whole input also goes through Conn.Recv as raw stream bytes (framing,
// short reads, oversize payloads), and a well-formed message round-trips
// through Conn.Send/Recv with its fds. Seeds: testdata/fuzz/FuzzProto
// (regenerate with PROTO_WRITE_SEEDS=1 go test -run TestWriteProtoSeeds).
package proto_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"vhost-target/vhost/proto"
)

// socketPair returns two connected unix stream sockets.
func socketPair(t testing.TB) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.UnixConn)
	}
	return conn(fds[0]), conn(fds[1])
}

// checkDecoders runs every payload decoder on p as the payload of req and
// checks each successful decode against the encoder.
func checkDecoders(t *testing.T, req proto.Request, p []byte, nfds int) {
	m := &proto.Msg{Header: proto.Header{Request: req, Flags: proto.FlagVersion, Size: uint32(len(p))}, Payload: p,
		FDs: make([]int, nfds)}
	for i := range m.FDs {
		m.FDs[i] = -1
	}
	if v, err := proto.U64(m); err == nil {
		if len(p) != 8 || !bytes.Equal(proto.PutU64(v), p) {
			t.Fatalf("U64 %#x from %x does not round-trip", v, p)
		}
	} else if len(p) == 8 || !errors.Is(err, proto.ErrPayloadSize) {
		t.Fatalf("U64 of %d bytes: %v", len(p), err)
	}
	if s, err := proto.DecodeVringState(m); err == nil {
		if !bytes.Equal(s.Encode(), p) {
			t.Fatalf("vring state %+v from %x does not round-trip", s, p)
		}
	} else if len(p) == proto.VringStateSize {
		t.Fatalf("vring state of 8 bytes: %v", err)
	}
	if a, err := proto.DecodeVringAddr(m); err == nil {
		if !bytes.Equal(a.Encode(), p) {
			t.Fatalf("vring addr %+v from %x does not round-trip", a, p)
		}
	} else if len(p) == proto.VringAddrSize {
		t.Fatalf("vring addr of 40 bytes: %v", err)
	}
	if r, err := proto.DecodeSingleRegion(m); err == nil {
		if e := proto.EncodeSingleRegion(r); !bytes.Equal(e[8:], p[8:]) {
			t.Fatalf("single region %+v from %x does not round-trip", r, p)
		}
	}
	if regs, err := proto.DecodeMemTable(m); err == nil {
		n := binary.LittleEndian.Uint32(p)
		if len(regs) != int(n) || n > proto.MaxMemRegions || nfds != int(n) {
			t.Fatalf("memory table: %d regions decoded, header says %d, %d fds", len(regs), n, nfds)
		}
		e := proto.EncodeMemTable(regs)
		// The encoder writes exactly n entries with zero padding; the regions must match.
		if !bytes.Equal(e[proto.MemoryHeaderSize:], p[proto.MemoryHeaderSize:len(e)]) {
			t.Fatalf("memory table %+v from %x does not round-trip", regs, p)
		}
		m2 := &proto.Msg{Header: m.Header, Payload: e, FDs: m.FDs}
		if regs2, err := proto.DecodeMemTable(m2); err != nil || fmt.Sprint(regs2) != fmt.Sprint(regs) {
			t.Fatalf("re-decoded memory table: %v %+v, want %+v", err, regs2, regs)
		}
	} else if len(p) >= proto.MemoryHeaderSize && !errors.Is(err, proto.ErrPayloadSize) && !errors.Is(err, proto.ErrRegionCount) {
		t.Fatalf("memory table error of unknown kind: %v", err)
	}
	if f, err := proto.DecodeInflight(m); err == nil {
		if len(p) != proto.InflightSize && len(p) != proto.InflightWireSize {
			t.Fatalf("inflight description from %d bytes", len(p))
		}
		// The encoder writes QEMU's 24 bytes with zero padding: the fields must match.
		if e := f.Encode(); !bytes.Equal(e[:proto.InflightSize], p[:proto.InflightSize]) {
			t.Fatalf("inflight %+v from %x does not round-trip", f, p)
		}
	} else if len(p) == proto.InflightSize || len(p) == proto.InflightWireSize || !errors.Is(err, proto.ErrPayloadSize) {
		t.Fatalf("inflight description of %d bytes: %v", len(p), err)
	}
	if c, data, err := proto.DecodeConfig(m); err == nil {
		if int(c.Size) != len(data) || c.Size > proto.ConfigMaxSize || len(p) != proto.ConfigHeaderSize+len(data) {
			t.Fatalf("config %+v with %d data bytes from %d-byte payload", c, len(data), len(p))
		}
		if !bytes.Equal(data, p[proto.ConfigHeaderSize:]) {
			t.Fatal("config data is not the payload tail")
		}
	}
}

// checkStream feeds raw bytes to Recv and reads until it fails: every
// message it returns must be a well-formed one taken from the stream.
func checkStream(t *testing.T, raw []byte) {
	a, b := socketPair(t)
	defer a.Close()
	defer b.Close()
	if _, err := a.Write(raw); err != nil {
		t.Fatal(err)
	}
	a.CloseWrite()
	c := proto.NewConn(b)
	off := 0
	for i := 0; ; i++ {
		m, err := c.Recv()
		if err != nil {
			return
		}
		if i > len(raw)/proto.HeaderSize {
			t.Fatalf("more messages than the stream holds")
		}
		if m.Flags&proto.FlagVersionMs != proto.FlagVersion || len(m.Payload) > proto.MaxPayload || int(m.Size) != len(m.Payload) || len(m.FDs) != 0 {
			t.Fatalf("Recv returned a malformed message: %+v", m.Header)
		}
		want := raw[off : off+proto.HeaderSize+len(m.Payload)]
		if binary.LittleEndian.Uint32(want) != uint32(m.Request) || !bytes.Equal(want[proto.HeaderSize:], m.Payload) {
			t.Fatalf("message %d differs from the stream bytes", i)
		}
		off += len(want)
	}
}

// checkSendRecv sends req with payload and nfds eventfds and checks what Recv returns.
func checkSendRecv(t *testing.T, a, b *proto.Conn, req proto.Request, flags uint32, p []byte, nfds int) {
	fds := make([]int, nfds)
	for i := range fds {
		fd, err := unix.Eventfd(uint(i+1), unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			t.Fatal(err)
		}
		fds[i] = fd
		defer unix.Close(fd)
	}
	flags = flags&^proto.FlagVersionMs | proto.FlagVersion
	if err := a.Send(req, flags, p, fds...); err != nil {
		if len(p) > proto.MaxPayload && errors.Is(err, proto.ErrTooLarge) {
			return
		}
		t.Fatalf("send %v: %v", req, err)
	}
	m, err := b.Recv()
	if err != nil {
		t.Fatalf("recv %v: %v", req, err)
	}
	defer m.CloseFDs()
	if m.Request != req || m.Flags != flags || !bytes.Equal(m.Payload, p) || len(m.FDs) != nfds {
		t.Fatalf("round trip: sent %v %#x %x with %d fds, got %v %#x %x with %d fds",
			req, flags, p, nfds, m.Request, m.Flags, m.Payload, len(m.FDs))
	}
	for i, fd := range m.FDs {
		var v [8]byte
		if _, err := unix.Read(fd, v[:]); err != nil || binary.LittleEndian.Uint64(v[:]) != uint64(i+1) {
			t.Fatalf("fd %d did not arrive as the eventfd sent: %v", i, err)
		}
	}
}

// protoInput splits a fuzz input: byte 0 picks the request, byte 1 the fd
// count (0..8) and flags, the rest is the payload.
func protoInput(in []byte) (proto.Request, uint32, int, []byte) {
	if len(in) < 2 {
		return proto.GetFeatures, proto.FlagVersion, 0, nil
	}
	return proto.Request(in[0]), uint32(in[1] >> 4), int(in[1]&15) % (proto.MaxFDs + 1), in[2:]
}

func FuzzProto(f *testing.F) {
	for _, s := range protoSeeds() {
		f.Add(s)
	}
	a, b := socketPair(f)
	f.Cleanup(func() { a.Close(); b.Close() })
	ca, cb := proto.NewConn(a), proto.NewConn(b)
	f.Fuzz(func(t *testing.T, in []byte) {
		req, flags, nfds, p := protoInput(in)
		checkDecoders(t, req, p, nfds)
		checkStream(t, in)
		checkSendRecv(t, ca, cb, req, flags, p, nfds)
	})
}

func protoSeeds() map[string][]byte {
	seed := func(req proto.Request, nfds int, p []byte) []byte { return append([]byte{byte(req), byte(nfds)}, p...) }
	regs := []proto.MemRegion{{GPA: 0, Size: 64 << 20, UVA: 0x7f0000000000, MmapOffset: 0},
		{GPA: 1 << 32, Size: 1 << 30, UVA: 0x7f1000000000, MmapOffset: 4096}}
	full := make([]byte, proto.MemoryHeaderSize+proto.MaxMemRegions*proto.MemRegionSize)
	copy(full, proto.EncodeMemTable(regs))
	cfg := make([]byte, proto.ConfigHeaderSize+4)
	binary.LittleEndian.PutUint32(cfg[4:], 4)
	hdr := make([]byte, proto.HeaderSize)
	binary.LittleEndian.PutUint32(hdr, uint32(proto.SetFeatures))
	binary.LittleEndian.PutUint32(hdr[4:], proto.FlagVersion)
	binary.LittleEndian.PutUint32(hdr[8:], 8)
	return map[string][]byte{
		"features":      seed(proto.SetFeatures, 0, proto.PutU64(1<<32|1<<30)),
		"vring-num":     seed(proto.SetVringNum, 0, proto.VringState{Index: 2, Num: 128}.Encode()),
		"vring-addr":    seed(proto.SetVringAddr, 0, proto.VringAddr{Index: 2, Desc: 0x7f0000001000, Used: 0x7f0000003000, Avail: 0x7f0000002000}.Encode()),
		"mem-table":     seed(proto.SetMemTable, 2, proto.EncodeMemTable(regs)),
		"mem-table-all": seed(proto.SetMemTable, 2, full),
		"add-mem-reg":   seed(proto.AddMemReg, 1, proto.EncodeSingleRegion(regs[1])),
		"get-config":    seed(proto.GetConfig, 0, cfg),
		"kick-nofd":     seed(proto.SetVringKick, 0, proto.PutU64(2|proto.VringNoFDBit)),
		"set-inflight":  seed(proto.SetInflightFD, 1, proto.Inflight{MmapSize: 3 * 2112, NumQueues: 3, QueueSize: 128}.Encode()),
		"two-messages":  append(append(append([]byte{}, hdr...), proto.PutU64(1)...), hdr...),
	}
}

// TestWriteProtoSeeds writes the seed corpus in the go fuzz file format.
func TestWriteProtoSeeds(t *testing.T) {
	if os.Getenv("PROTO_WRITE_SEEDS") == "" {
		t.Skip("set PROTO_WRITE_SEEDS=1 to regenerate testdata/fuzz/FuzzProto")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzProto")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, s := range protoSeeds() {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", s)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
