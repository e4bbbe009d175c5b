package rpc

// Goal: the server answers what SPDK's rpc.py and JSON-RPC 2.0 clients send
// exactly as the package documentation says, refuses everything else with
// the right error, and no client can crash it or hold up another.
// Method: raw bytes over a real unix socket (the wire format is what is
// tested, so most tests do not use Client), one malformation per table row,
// each followed by a good request on the same connection to show that the
// connection survived.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// testMethods registers the methods the tests call.
func testMethods(s *Server) {
	s.Register("echo", func(ctx context.Context, params json.RawMessage) (any, error) {
		if params == nil {
			return "no params", nil
		}
		return params, nil
	})
	s.Register("add", func(ctx context.Context, params json.RawMessage) (any, error) {
		var p struct {
			A int `json:"a"`
			B int `json:"b"`
		}
		if err := DecodeParams(params, &p); err != nil {
			return nil, err
		}
		return p.A + p.B, nil
	})
	s.Register("enodev", func(ctx context.Context, params json.RawMessage) (any, error) {
		return nil, Errnof(syscall.ENODEV, "bdev %q does not exist", "nope")
	})
	s.Register("wrapped", func(ctx context.Context, params json.RawMessage) (any, error) {
		return nil, fmt.Errorf("deleting m0: %w", Errno(syscall.EBUSY))
	})
	s.Register("plain", func(ctx context.Context, params json.RawMessage) (any, error) {
		return nil, errors.New("disk on fire")
	})
	s.Register("panic", func(ctx context.Context, params json.RawMessage) (any, error) {
		panic("handler bug")
	})
	s.Register("unencodable", func(ctx context.Context, params json.RawMessage) (any, error) {
		return make(chan int), nil
	})
	s.Register("nil", func(ctx context.Context, params json.RawMessage) (any, error) {
		return nil, nil
	})
}

// serve starts a server with opts and testMethods on a socket in a fresh
// directory and returns it with the socket's path; the test closes it.
func serve(t testing.TB, opts Options) (*Server, string) {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	s := NewServer(opts)
	testMethods(s)
	path := filepath.Join(t.TempDir(), "rpc.sock")
	if err := s.Listen(path, 0o600, -1, -1); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, path
}

// rawConn is a test client that writes bytes and reads replies one JSON
// value at a time.
type rawConn struct {
	t    testing.TB
	conn net.Conn
	dec  *json.Decoder
}

func dialRaw(t testing.TB, path string) *rawConn {
	t.Helper()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &rawConn{t: t, conn: c, dec: json.NewDecoder(c)}
}

func (r *rawConn) send(s string) {
	r.t.Helper()
	if _, err := io.WriteString(r.conn, s); err != nil {
		r.t.Fatal(err)
	}
}

// next reads one reply, failing the test after 5 s.
func (r *rawConn) next() json.RawMessage {
	r.t.Helper()
	r.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	var v json.RawMessage
	if err := r.dec.Decode(&v); err != nil {
		r.t.Fatalf("reading reply: %v", err)
	}
	return v
}

// testReply is a reply as the tests check it.
type testReply struct {
	JSONRPC string          `json:"jsonrpc"`
	ID      json.RawMessage `json:"id"`
	Result  json.RawMessage `json:"result"`
	Error   *Error          `json:"error"`
}

func decodeReply(t testing.TB, raw json.RawMessage) testReply {
	t.Helper()
	var r testReply
	if err := json.Unmarshal(raw, &r); err != nil {
		t.Fatalf("reply %s: %v", raw, err)
	}
	if r.JSONRPC != "2.0" || r.ID == nil || (r.Result == nil) == (r.Error == nil) {
		t.Fatalf("reply %s is not a JSON-RPC 2.0 response", raw)
	}
	return r
}

// TestRPCPyRequest sends what SPDK's rpc.py sends (json.dumps(req,
// indent=2), no newline after it) and checks the reply byte for byte: the
// member order SPDK writes and a newline after the object.
func TestRPCPyRequest(t *testing.T) {
	_, path := serve(t, Options{})
	c := dialRaw(t, path)
	c.send("{\n  \"jsonrpc\": \"2.0\",\n  \"method\": \"add\",\n  \"id\": 1,\n  \"params\": {\n    \"a\": 2,\n    \"b\": 3\n  }\n}")
	line, err := bufio.NewReader(c.conn).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"jsonrpc":"2.0","id":1,"result":5}` + "\n"; line != want {
		t.Fatalf("reply %q, want %q", line, want)
	}
}

// TestPipelined sends several requests in one write, with and without
// whitespace between them, and wants the replies in request order.
func TestPipelined(t *testing.T) {
	_, path := serve(t, Options{})
	c := dialRaw(t, path)
	var b strings.Builder
	for i := range 20 {
		fmt.Fprintf(&b, `{"jsonrpc":"2.0","method":"add","params":{"a":%d,"b":1},"id":%d}`, i, i)
		if i%3 == 0 {
			b.WriteString("\n \t")
		}
	}
	c.send(b.String())
	for i := range 20 {
		r := decodeReply(t, c.next())
		if string(r.ID) != fmt.Sprint(i) || string(r.Result) != fmt.Sprint(i+1) {
			t.Fatalf("reply %d: id %s result %s", i, r.ID, r.Result)
		}
	}
}

// TestRequests is one row per kind of request: the reply's id and result or
// error code (and part of its message). A row with no reply must send none:
// the good request after it must be answered first.
func TestRequests(t *testing.T) {
	_, path := serve(t, Options{})
	rows := []struct {
		name    string
		req     string
		noReply bool
		id      string
		result  string
		code    int
		msg     string
	}{
		{name: "result", req: `{"jsonrpc":"2.0","method":"add","params":{"a":1,"b":2},"id":7}`, id: "7", result: "3"},
		{name: "string id", req: `{"jsonrpc":"2.0","method":"add","id":"x-1"}`, id: `"x-1"`, result: "0"},
		{name: "null id gets a reply", req: `{"jsonrpc":"2.0","method":"add","id":null}`, id: "null", result: "0"},
		{name: "fractional id", req: `{"jsonrpc":"2.0","method":"add","id":1.5e3}`, id: "1.5e3", result: "0"},
		{name: "no params", req: `{"jsonrpc":"2.0","method":"echo","id":1}`, id: "1", result: `"no params"`},
		{name: "null params", req: `{"jsonrpc":"2.0","method":"echo","params":null,"id":1}`, id: "1", result: `"no params"`},
		{name: "array params", req: `{"jsonrpc":"2.0","method":"echo","params":[1,2],"id":1}`, id: "1", result: `[1,2]`},
		{name: "nil result", req: `{"jsonrpc":"2.0","method":"nil","id":1}`, id: "1", result: "null"},
		{name: "notification", req: `{"jsonrpc":"2.0","method":"add"}`, noReply: true},
		{name: "failing notification", req: `{"jsonrpc":"2.0","method":"enodev"}`, noReply: true},
		{name: "notification of an unknown method", req: `{"jsonrpc":"2.0","method":"nope"}`, noReply: true},

		{name: "no jsonrpc", req: `{"method":"add","id":1}`, id: "1", code: CodeInvalidRequest, msg: `"jsonrpc" must be "2.0"`},
		{name: "jsonrpc 1.0", req: `{"jsonrpc":"1.0","method":"add","id":1}`, id: "1", code: CodeInvalidRequest, msg: `"jsonrpc" must be "2.0"`},
		{name: "jsonrpc number", req: `{"jsonrpc":2.0,"method":"add","id":1}`, id: "1", code: CodeInvalidRequest},
		{name: "invalid notification", req: `{"jsonrpc":"1.0","method":"add"}`, id: "null", code: CodeInvalidRequest},
		{name: "no method", req: `{"jsonrpc":"2.0","id":1}`, id: "1", code: CodeInvalidRequest, msg: `"method" must be a string`},
		{name: "method number", req: `{"jsonrpc":"2.0","method":1,"id":1}`, id: "1", code: CodeInvalidRequest},
		{name: "params string", req: `{"jsonrpc":"2.0","method":"add","params":"a=1","id":1}`, id: "1", code: CodeInvalidRequest, msg: `"params" must be`},
		{name: "params number", req: `{"jsonrpc":"2.0","method":"add","params":3,"id":1}`, id: "1", code: CodeInvalidRequest},
		{name: "id bool", req: `{"jsonrpc":"2.0","method":"add","id":true}`, id: "null", code: CodeInvalidRequest, msg: `"id" must be`},
		{name: "id object", req: `{"jsonrpc":"2.0","method":"add","id":{}}`, id: "null", code: CodeInvalidRequest},
		{name: "unknown member", req: `{"jsonrpc":"2.0","method":"add","id":1,"extra":0}`, id: "1", code: CodeInvalidRequest, msg: `unknown member "extra"`},
		{name: "member case", req: `{"JSONRPC":"2.0","method":"add","id":1}`, id: "1", code: CodeInvalidRequest},
		{name: "number", req: `42`, id: "null", code: CodeInvalidRequest, msg: "not an object"},
		{name: "string", req: `"add"`, id: "null", code: CodeInvalidRequest},
		{name: "null", req: `null`, id: "null", code: CodeInvalidRequest},
		{name: "true", req: `true`, id: "null", code: CodeInvalidRequest},
		{name: "empty batch", req: `[]`, id: "null", code: CodeInvalidRequest, msg: "empty batch"},

		{name: "unknown method", req: `{"jsonrpc":"2.0","method":"nope","id":1}`, id: "1", code: CodeMethodNotFound, msg: `"nope"`},
		{name: "unknown parameter", req: `{"jsonrpc":"2.0","method":"add","params":{"c":1},"id":1}`, id: "1", code: CodeInvalidParams, msg: `unknown parameter "c"`},
		{name: "parameter type", req: `{"jsonrpc":"2.0","method":"add","params":{"a":"1"},"id":1}`, id: "1", code: CodeInvalidParams, msg: `parameter "a" must be an integer, not a string`},
		{name: "errno error", req: `{"jsonrpc":"2.0","method":"enodev","id":1}`, id: "1", code: -19, msg: `bdev "nope" does not exist`},
		{name: "wrapped errno error", req: `{"jsonrpc":"2.0","method":"wrapped","id":1}`, id: "1", code: -16, msg: "deleting m0: Device or resource busy"},
		{name: "plain error", req: `{"jsonrpc":"2.0","method":"plain","id":1}`, id: "1", code: CodeInternalError, msg: "disk on fire"},
		{name: "panic", req: `{"jsonrpc":"2.0","method":"panic","id":1}`, id: "1", code: CodeInternalError, msg: "panicked"},
		{name: "unencodable result", req: `{"jsonrpc":"2.0","method":"unencodable","id":1}`, id: "1", code: CodeInternalError, msg: "does not encode"},
	}
	c := dialRaw(t, path)
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			c.t = t
			c.send(row.req)
			c.send(`{"jsonrpc":"2.0","method":"echo","params":["after"],"id":"after"}`)
			if !row.noReply {
				r := decodeReply(t, c.next())
				if string(r.ID) != row.id {
					t.Errorf("id %s, want %s", r.ID, row.id)
				}
				if row.code != 0 {
					if r.Error == nil || r.Error.Code != row.code || !strings.Contains(r.Error.Message, row.msg) {
						t.Errorf("reply %+v %s, want error %d containing %q", r.Error, r.Result, row.code, row.msg)
					}
				} else if string(r.Result) != row.result {
					t.Errorf("result %s (error %+v), want %s", r.Result, r.Error, row.result)
				}
			}
			if r := decodeReply(t, c.next()); string(r.ID) != `"after"` {
				t.Fatalf("the request after got reply id %s", r.ID)
			}
		})
	}
}

// TestBatch sends a batch of a good request, a notification, an invalid
// element and a failing request: one array of three replies, in order.
func TestBatch(t *testing.T) {
	_, path := serve(t, Options{})
	c := dialRaw(t, path)
	c.send(`[{"jsonrpc":"2.0","method":"add","params":{"a":1},"id":1},
		{"jsonrpc":"2.0","method":"add"},
		7,
		{"jsonrpc":"2.0","method":"nope","id":"z"}]`)
	var replies []json.RawMessage
	if err := json.Unmarshal(c.next(), &replies); err != nil {
		t.Fatal(err)
	}
	if len(replies) != 3 {
		t.Fatalf("%d replies, want 3", len(replies))
	}
	if r := decodeReply(t, replies[0]); string(r.ID) != "1" || string(r.Result) != "1" {
		t.Errorf("first: %s", replies[0])
	}
	if r := decodeReply(t, replies[1]); string(r.ID) != "null" || r.Error == nil || r.Error.Code != CodeInvalidRequest {
		t.Errorf("second: %s", replies[1])
	}
	if r := decodeReply(t, replies[2]); string(r.ID) != `"z"` || r.Error == nil || r.Error.Code != CodeMethodNotFound {
		t.Errorf("third: %s", replies[2])
	}

	// A batch of notifications only is not answered at all.
	c.send(`[{"jsonrpc":"2.0","method":"add"},{"jsonrpc":"2.0","method":"echo"}]{"jsonrpc":"2.0","method":"add","id":2}`)
	if r := decodeReply(t, c.next()); string(r.ID) != "2" {
		t.Fatalf("got %s before the reply to id 2", r.ID)
	}
}

// TestParseError: bytes that are not JSON get one -32700 reply with id null
// and that connection is closed; another connection is untouched.
func TestParseError(t *testing.T) {
	_, path := serve(t, Options{})
	other := NewTestClient(t, path)
	for _, bad := range []string{
		`{"jsonrpc":"2.0",,}`,
		`{"jsonrpc":"2.0","method":"add","id":1}}`, // the stray } is the next value
		"\x00",
		`{"a":'b'}`,
		`]`,
	} {
		c := dialRaw(t, path)
		c.send(bad)
		var r testReply
		for {
			r = decodeReply(t, c.next())
			if r.Error != nil {
				break
			}
		}
		if string(r.ID) != "null" || r.Error.Code != CodeParseError {
			t.Errorf("%q: reply %+v id %s, want a parse error with id null", bad, r.Error, r.ID)
		}
		c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := c.conn.Read(make([]byte, 1)); err != io.EOF {
			t.Errorf("%q: after the parse error read %d, %v; want EOF", bad, n, err)
		}
		var sum int
		if err := other.Call(context.Background(), "add", map[string]int{"a": 1, "b": 1}, &sum); err != nil || sum != 2 {
			t.Fatalf("other connection: %d, %v", sum, err)
		}
	}
}

// TestClosedInsideRequest: a client that half-closes in the middle of a
// request is told so.
func TestClosedInsideRequest(t *testing.T) {
	_, path := serve(t, Options{})
	c := dialRaw(t, path)
	c.send(`{"jsonrpc":"2.0","method":`)
	c.conn.(*net.UnixConn).CloseWrite()
	r := decodeReply(t, c.next())
	if r.Error == nil || r.Error.Code != CodeParseError {
		t.Fatalf("reply %+v", r.Error)
	}
}

// repeatReader yields prefix, then fill repeated until n bytes in all.
type repeatReader struct {
	prefix string
	fill   byte
	n      int
}

func (r *repeatReader) Read(p []byte) (int, error) {
	if r.n <= 0 {
		return 0, io.EOF
	}
	p = p[:min(len(p), r.n)]
	i := copy(p, r.prefix)
	r.prefix = r.prefix[i:]
	for ; i < len(p); i++ {
		p[i] = r.fill
	}
	r.n -= len(p)
	return len(p), nil
}

// TestHugeRequest streams 64 MiB requests (nested arrays; a string that
// never ends) and wants a -32700 reply within seconds, the server's memory
// bounded far below the request's size, and the connection closed.
func TestHugeRequest(t *testing.T) {
	_, path := serve(t, Options{})
	for _, r := range []*repeatReader{
		{fill: '[', n: 64 << 20},
		{prefix: `{"jsonrpc":"2.0","method":"echo","id":1,"params":{"s":"`, fill: 'a', n: 64 << 20},
		{fill: ' ', n: 64 << 20},
	} {
		name := r.prefix + string(r.fill)
		c := dialRaw(t, path)
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		start := time.Now()
		sent := make(chan int64, 1)
		go func() {
			n, _ := io.Copy(c.conn, r) // fails once the server closes
			sent <- n
		}()
		rep := decodeReply(t, c.next())
		elapsed := time.Since(start)
		runtime.ReadMemStats(&after)
		if rep.Error == nil || rep.Error.Code != CodeParseError {
			t.Errorf("%.20q: reply %+v, want a parse error", name, rep.Error)
		}
		if n := <-sent; n >= 64<<20 {
			t.Errorf("%.20q: the server read all %d bytes", name, n)
		}
		if elapsed > 5*time.Second {
			t.Errorf("%.20q: refused after %v", name, elapsed)
		}
		// The decoder's buffer grows by doubling to hold at most
		// MaxRequestBytes: a few MiB allocated in all, not 64.
		if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 16<<20 {
			t.Errorf("%.20q: %d MiB allocated while refusing it", name, alloc>>20)
		}
		t.Logf("%.20q: refused in %v: %s", name, elapsed, rep.Error.Message)
	}
}

// TestRequestSizeLimit: a request of just under MaxRequestBytes is served,
// one just over is refused.
func TestRequestSizeLimit(t *testing.T) {
	const limit = 4096
	_, path := serve(t, Options{MaxRequestBytes: limit})
	head, tail := `{"jsonrpc":"2.0","method":"echo","id":1,"params":{"s":"`, `"}}`
	for _, size := range []int{limit, limit + 1} {
		c := dialRaw(t, path)
		c.send(head + strings.Repeat("x", size-len(head)-len(tail)) + tail)
		r := decodeReply(t, c.next())
		if tooLarge := r.Error != nil && r.Error.Code == CodeParseError; tooLarge != (size > limit) {
			t.Errorf("request of %d bytes (limit %d): reply error %+v", size, limit, r.Error)
		}
	}
	// Many requests under the limit, pipelined in one write, are all served:
	// the limit is per request, not per read.
	c := dialRaw(t, path)
	one := head + strings.Repeat("y", limit/2) + tail
	c.send(strings.Repeat(one, 10))
	for i := range 10 {
		if r := decodeReply(t, c.next()); r.Error != nil {
			t.Fatalf("request %d: %+v", i, r.Error)
		}
	}
}

// NewTestClient dials path and closes the client at the end of the test.
func NewTestClient(t testing.TB, path string) *Client {
	t.Helper()
	c, err := Dial(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestManyClients: 50 connections make 100 calls each at the same time; every
// result is right (run with -race).
func TestManyClients(t *testing.T) {
	_, path := serve(t, Options{})
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for i := range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := Dial(path)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			for j := range 100 {
				var sum int
				if err := c.Call(context.Background(), "add", map[string]int{"a": i, "b": j}, &sum); err != nil {
					errs <- err
					return
				}
				if sum != i+j {
					errs <- fmt.Errorf("client %d call %d: %d", i, j, sum)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestConnectionLimit: with MaxConnections 2, a third connection gets a
// CodeServerBusy reply and is closed while the two go on; once one of them
// closes, a new connection is served.
func TestConnectionLimit(t *testing.T) {
	_, path := serve(t, Options{MaxConnections: 2})
	a, b := NewTestClient(t, path), NewTestClient(t, path)
	for _, c := range []*Client{a, b} {
		if err := c.Call(context.Background(), "add", nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	third := NewTestClient(t, path)
	var e *Error
	if err := third.Call(context.Background(), "add", nil, nil); !errors.As(err, &e) || e.Code != CodeServerBusy {
		t.Fatalf("third connection: %v, want a server-busy error", err)
	}
	for _, c := range []*Client{a, b} {
		if err := c.Call(context.Background(), "add", nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	a.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		c := NewTestClient(t, path)
		err := c.Call(context.Background(), "add", nil, nil)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no connection served after one closed: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestStalledClient: a client that sends requests with large replies and
// never reads them is disconnected after WriteTimeout; meanwhile another
// client's calls are answered at once.
func TestStalledClient(t *testing.T) {
	s, path := serve(t, Options{WriteTimeout: 300 * time.Millisecond})
	s.Register("big", func(ctx context.Context, params json.RawMessage) (any, error) {
		return strings.Repeat("z", 1<<20), nil
	})
	stalled := dialRaw(t, path)
	go func() {
		for i := 0; i < 64; i++ {
			if _, err := io.WriteString(stalled.conn, `{"jsonrpc":"2.0","method":"big","id":1}`); err != nil {
				return
			}
		}
	}()
	other := NewTestClient(t, path)
	for i := range 20 {
		start := time.Now()
		if err := other.Call(context.Background(), "add", nil, nil); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d > time.Second {
			t.Fatalf("call %d took %v beside a stalled client", i, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The stalled connection was closed: reading it drains the replies
	// written before the timeout and then ends (in a reset, as the server
	// closed with requests unread). Nothing is read before the server has
	// closed it: on a loaded machine the server may not have filled the
	// socket buffer yet, and a reader would keep it from ever stalling.
	if !peerClosed(stalled.conn, 10*time.Second) {
		t.Fatal("the server did not close a connection whose replies went unread")
	}
	stalled.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := io.Copy(io.Discard, stalled.conn)
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("stalled connection not closed by the server: read %d bytes, %v", n, err)
	}
	if n >= 64<<20 {
		t.Fatalf("every reply was written (%d bytes): the client never stalled the server", n)
	}
}

// TestCloseWaitsForHandlers: Close cancels a running handler's context and
// returns only after the handler did; the socket file is removed.
func TestCloseWaitsForHandlers(t *testing.T) {
	s, path := serve(t, Options{})
	started := make(chan struct{})
	var returned atomic.Bool
	s.Register("block", func(ctx context.Context, params json.RawMessage) (any, error) {
		close(started)
		<-ctx.Done()
		time.Sleep(50 * time.Millisecond) // cleanup Close must wait for
		returned.Store(true)
		return nil, ctx.Err()
	})
	c := NewTestClient(t, path)
	callErr := make(chan error, 1)
	go func() { callErr <- c.Call(context.Background(), "block", nil, nil) }()
	<-started
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if !returned.Load() {
		t.Fatal("Close returned before the handler did")
	}
	if err := <-callErr; err == nil {
		t.Fatal("the call interrupted by Close succeeded")
	}
	if _, err := net.Dial("unix", path); err == nil {
		t.Fatal("socket still accepts after Close")
	}
	if err := s.Listen(path, 0o600, -1, -1); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Listen after Close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// TestPanicLogged: a handler panic is logged with the method and the panic
// value, and the server keeps serving.
func TestPanicLogged(t *testing.T) {
	var logBuf syncBuffer
	_, path := serve(t, Options{Logger: slog.New(slog.NewTextHandler(&logBuf, nil))})
	c := NewTestClient(t, path)
	var e *Error
	if err := c.Call(context.Background(), "panic", nil, nil); !errors.As(err, &e) || e.Code != CodeInternalError {
		t.Fatalf("panic: %v", err)
	}
	if err := c.Call(context.Background(), "add", nil, nil); err != nil {
		t.Fatalf("after the panic: %v", err)
	}
	if log := logBuf.String(); !strings.Contains(log, "method=panic") || !strings.Contains(log, "handler bug") {
		t.Fatalf("log: %s", log)
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestServe: Serve on a caller's listener returns ErrServerClosed after
// Close.
func TestServe(t *testing.T) {
	ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(Options{})
	testMethods(s)
	done := make(chan error, 1)
	go func() { done <- s.Serve(ln) }()
	c := NewTestClient(t, ln.Addr().String())
	var sum int
	if err := c.Call(context.Background(), "add", map[string]int{"a": 2, "b": 2}, &sum); err != nil || sum != 4 {
		t.Fatalf("%d, %v", sum, err)
	}
	s.Close()
	if err := <-done; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve returned %v", err)
	}
}

// TestRegisterMisuse: registering a name twice panics.
func TestRegisterMisuse(t *testing.T) {
	s := NewServer(Options{})
	s.Register("a", func(context.Context, json.RawMessage) (any, error) { return nil, nil })
	defer func() {
		if recover() == nil {
			t.Fatal("no panic")
		}
	}()
	s.Register("a", func(context.Context, json.RawMessage) (any, error) { return nil, nil })
}

// peerClosed waits up to d for the other end of conn to close (POLLRDHUP),
// without reading from it.
func peerClosed(conn net.Conn, d time.Duration) bool {
	raw, err := conn.(*net.UnixConn).SyscallConn()
	if err != nil {
		return false
	}
	gone := false
	deadline := time.Now().Add(d)
	for !gone && time.Now().Before(deadline) {
		raw.Control(func(fd uintptr) {
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
			if n, err := unix.Poll(fds, 100); err == nil && n == 1 {
				gone = fds[0].Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR) != 0
			}
		})
	}
	return gone
}
