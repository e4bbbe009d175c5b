package rpc

// Goal: no byte stream a client sends crashes the server, hangs it, or
// draws a reply that is not JSON-RPC 2.0.
// Method: the stream is read from an in-memory connection (EOF at its end)
// by the server's own connection code, with the test methods registered
// and a small request limit; every value written back is checked.

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"
)

// fuzzConn is a net.Conn whose reads come from a byte slice and whose
// writes are kept.
type fuzzConn struct {
	in  *bytes.Reader
	mu  sync.Mutex
	out bytes.Buffer
}

func (c *fuzzConn) Read(p []byte) (int, error) { return c.in.Read(p) }
func (c *fuzzConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.out.Write(p)
}
func (c *fuzzConn) Close() error                     { return nil }
func (c *fuzzConn) LocalAddr() net.Addr              { return &net.UnixAddr{Net: "unix"} }
func (c *fuzzConn) RemoteAddr() net.Addr             { return &net.UnixAddr{Net: "unix"} }
func (c *fuzzConn) SetDeadline(time.Time) error      { return nil }
func (c *fuzzConn) SetReadDeadline(time.Time) error  { return nil }
func (c *fuzzConn) SetWriteDeadline(time.Time) error { return nil }

func FuzzServer(f *testing.F) {
	for _, seed := range []string{
		"{\n  \"jsonrpc\": \"2.0\",\n  \"method\": \"add\",\n  \"id\": 1,\n  \"params\": {\n    \"a\": 2,\n    \"b\": 3\n  }\n}",
		`{"jsonrpc":"2.0","method":"echo","params":[1,{"x":null}],"id":"a"}{"jsonrpc":"2.0","method":"add"}` + "\n",
		`[{"jsonrpc":"2.0","method":"add","id":1},{"jsonrpc":"2.0","method":"enodev"},3,{"jsonrpc":"2.0","method":"nope","id":null}]`,
		`[]`,
		`{"jsonrpc":"2.0","method":"panic","id":1}{"jsonrpc":"2.0","method":"plain","id":2}{"jsonrpc":"2.0","method":"unencodable","id":3}`,
		`{"jsonrpc":"2.0","method":"add","params":{"a":"1","c":2},"id":1}`,
		`{"jsonrpc":"1.0","method":"add","id":true,"extra":1}`,
		`{"jsonrpc":"2.0","method":"add","id":1}}`,
		`{"jsonrpc":"2.0","method":`,
		`[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[`,
		`"\ud800" 1e999 -0 null true`,
		"\xff\xfe{}",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		s := NewServer(Options{MaxRequestBytes: 4096, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		testMethods(s)
		c := &fuzzConn{in: bytes.NewReader(data)}
		s.admit(c)
		done := make(chan struct{})
		go func() { s.wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("connection still served 10 s after its input ended")
		}
		checkReplies(t, c.out.Bytes())
	})
}

// checkReplies fails t unless out is a sequence of JSON-RPC 2.0 replies
// (objects, or non-empty arrays of objects), each followed by a newline,
// with a parse error, if any, last.
func checkReplies(t *testing.T, out []byte) {
	dec := json.NewDecoder(bytes.NewReader(out))
	parseError := false
	for {
		var v json.RawMessage
		err := dec.Decode(&v)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("output is not a JSON stream: %v\n%q", err, out)
		}
		if parseError {
			t.Fatalf("a reply after a parse error:\n%q", out)
		}
		var replies []json.RawMessage
		if bytes.HasPrefix(v, []byte("[")) {
			if err := json.Unmarshal(v, &replies); err != nil || len(replies) == 0 {
				t.Fatalf("batch reply %s", v)
			}
		} else {
			replies = []json.RawMessage{v}
		}
		for _, r := range replies {
			if code := checkReply(t, r); code == CodeParseError {
				parseError = true
			}
		}
	}
	if len(out) > 0 && out[len(out)-1] != '\n' {
		t.Fatalf("last reply not followed by a newline: %q", out)
	}
}

// checkReply fails t unless r is one reply object; it returns the error
// code, 0 for a result.
func checkReply(t *testing.T, r json.RawMessage) int {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(r, &m); err != nil {
		t.Fatalf("reply %s: %v", r, err)
	}
	if string(m["jsonrpc"]) != `"2.0"` {
		t.Fatalf("reply %s: jsonrpc", r)
	}
	id, ok := m["id"]
	if !ok || firstByte(id) == '{' || firstByte(id) == '[' || firstByte(id) == 't' || firstByte(id) == 'f' {
		t.Fatalf("reply %s: id", r)
	}
	result, hasResult := m["result"]
	rawErr, hasError := m["error"]
	if hasResult == hasError || len(m) != 3 {
		t.Fatalf("reply %s: want jsonrpc, id and one of result and error", r)
	}
	if hasResult {
		_ = result
		return 0
	}
	var e struct {
		Code    *int    `json:"code"`
		Message *string `json:"message"`
	}
	if err := json.Unmarshal(rawErr, &e); err != nil || e.Code == nil || e.Message == nil || *e.Code == 0 {
		t.Fatalf("reply %s: error object", r)
	}
	return *e.Code
}
