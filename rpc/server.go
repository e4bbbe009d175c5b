// Package rpc is the JSON-RPC 2.0 management transport: a server on a unix
// stream socket and a client for it. It speaks what SPDK's JSON-RPC server
// speaks (lib/jsonrpc/jsonrpc_server.c, jsonrpc_server_tcp.c), so SPDK's
// scripts/rpc.py and orchestration written for SPDK can drive vhost-target:
//
//   - The connection carries a stream of JSON values, one request each, not
//     necessarily separated by newlines (rpc.py sends `json.dumps(req,
//     indent=2)` and joins several with "\n"); whitespace between them is
//     skipped.
//   - Each request gets one reply, a JSON object followed by "\n", with the
//     members in SPDK's order: {"jsonrpc":"2.0","id":ID,"result":R} or
//     {"jsonrpc":"2.0","id":ID,"error":{"code":C,"message":M}}. Replies on a
//     connection come in the order of its requests.
//   - A request is an object with "jsonrpc":"2.0", a string "method", and
//     optionally "params" (an object or an array; null is the same as none,
//     as in SPDK) and "id" (a string, a number or null). Members other than
//     these four make it invalid, as SPDK's strict object decoder does.
//   - Bytes that are not JSON get a -32700 reply and the connection is closed:
//     a stream of JSON values has no point to resynchronise at (SPDK does the
//     same). Everything else (an invalid request, an unknown method, a handler
//     error or panic) gets an error reply and the connection carries on.
//
// Where SPDK departs from JSON-RPC 2.0 this package follows the specification:
// a request without an id (a notification) gets no reply even when it fails,
// a request with "id": null gets one, and a batch (an array of requests) is
// answered with an array, where SPDK refuses batches. rpc.py always sends a
// numeric id and never a batch, so it sees no difference.
package rpc

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"sort"
	"sync"
	"time"
)

// Handler runs one method. params is the request's "params" member, nil
// when it was absent or null (DecodeParams decodes both as {}). The result
// is sent as JSON; an error is sent as an error reply (see Error). ctx is
// cancelled when the server closes.
type Handler func(ctx context.Context, params json.RawMessage) (any, error)

// Limits a zero Options field stands for.
const (
	// MaxRequestBytesDefault is far above any management request (the
	// largest, a whole configuration for framework_reload, is a few KiB)
	// and small enough that 64 connections at the limit cost little memory.
	MaxRequestBytesDefault = 1 << 20
	// MaxConnectionsDefault is SPDK's SPDK_JSONRPC_MAX_CONNS.
	MaxConnectionsDefault = 64
	// WriteTimeoutDefault is how long one reply may take to write before the
	// client is taken to have stopped reading and is disconnected.
	WriteTimeoutDefault = 10 * time.Second
)

// refuseLinger is how long a connection refused at MaxConnections is kept
// open after its error reply, so that a client that writes its request
// before reading (rpc.py does) reads the reply rather than failing to write.
const refuseLinger = time.Second

// Options are a server's limits. The zero value means the defaults.
type Options struct {
	// MaxRequestBytes bounds one request (a batch is one request),
	// whitespace before it included. A larger one gets a -32700 reply and
	// its connection is closed after at most this many bytes were read.
	MaxRequestBytes int
	// MaxConnections bounds the connections served at once. A connection
	// beyond it gets one CodeServerBusy reply and is closed; the others are
	// not affected.
	MaxConnections int
	// WriteTimeout bounds the writing of one reply; a client that does not
	// read its replies is disconnected after it.
	WriteTimeout time.Duration
	// Logger receives handler panics, refused connections and closed
	// connections; nil means slog.Default().
	Logger *slog.Logger
}

// ErrServerClosed is returned by Serve and Listen after Close.
var ErrServerClosed = errors.New("rpc: server closed")

// Server is a JSON-RPC 2.0 server. Register methods, then Listen or Serve;
// Close stops it.
type Server struct {
	opts   Options
	log    *slog.Logger
	ctx    context.Context // handlers' context, cancelled by Close
	cancel context.CancelFunc

	methodsMu sync.RWMutex
	methods   map[string]Handler

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[net.Conn]struct{} // served and refused connections
	served    int                   // connections in conns being served
	wg        sync.WaitGroup        // accept loops and connection goroutines
}

// NewServer returns a server with no methods.
func NewServer(opts Options) *Server {
	if opts.MaxRequestBytes <= 0 {
		opts.MaxRequestBytes = MaxRequestBytesDefault
	}
	if opts.MaxConnections <= 0 {
		opts.MaxConnections = MaxConnectionsDefault
	}
	if opts.WriteTimeout <= 0 {
		opts.WriteTimeout = WriteTimeoutDefault
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Server{opts: opts, log: log, ctx: ctx, cancel: cancel,
		methods: map[string]Handler{}, listeners: map[net.Listener]struct{}{}, conns: map[net.Conn]struct{}{}}
}

// Register makes h answer method. It may be called while the server runs.
// An empty name, a nil handler or a name registered twice is a programming
// error and panics, as http.ServeMux does.
func (s *Server) Register(method string, h Handler) {
	if method == "" || h == nil {
		panic("rpc: Register with an empty method name or a nil handler")
	}
	s.methodsMu.Lock()
	defer s.methodsMu.Unlock()
	if _, dup := s.methods[method]; dup {
		panic(fmt.Sprintf("rpc: method %q registered twice", method))
	}
	s.methods[method] = h
}

func (s *Server) handler(method string) Handler {
	s.methodsMu.RLock()
	defer s.methodsMu.RUnlock()
	return s.methods[method]
}

// Listen creates the unix socket path, gives it mode and, unless -1, owner
// uid and group gid, and serves it until Close, which removes it. Whoever
// can connect can change the target, so it refuses a directory that is
// world-writable without the sticky bit, never follows or replaces what is
// not a socket, and replaces a socket only when nobody listens on it.
func (s *Server) Listen(path string, mode os.FileMode, uid, gid int) error {
	ln, err := listenUnix(path, mode, uid, gid)
	if err != nil {
		return err
	}
	if err := s.track(ln); err != nil {
		ln.Close()
		return err
	}
	// Counted before Listen returns, so that a Close right after it waits
	// for the accept loop and the socket file is gone when Close returns.
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := s.accept(ln); err != nil && !errors.Is(err, ErrServerClosed) {
			s.log.Error("rpc: accept failed; the JSON-RPC socket no longer accepts connections", "socket", path, "err", err)
		}
	}()
	return nil
}

// Serve accepts connections on ln until Close (it then returns
// ErrServerClosed) or until ln fails. Close closes ln.
func (s *Server) Serve(ln net.Listener) error {
	if err := s.track(ln); err != nil {
		ln.Close()
		return err
	}
	return s.accept(ln)
}

func (s *Server) track(ln net.Listener) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrServerClosed
	}
	s.listeners[ln] = struct{}{}
	return nil
}

func (s *Server) accept(ln net.Listener) error {
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return ErrServerClosed
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// Out of file descriptors and the like pass; back off as
			// net/http does rather than spin.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.log.Warn("rpc: accept failed; retrying", "err", err, "retry_in", delay)
			time.Sleep(delay)
			continue
		}
		delay = 0
		s.admit(c)
	}
}

// admit starts serving c, or refusing it when MaxConnections are served.
func (s *Server) admit(c net.Conn) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		c.Close()
		return
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	refuse := s.served >= s.opts.MaxConnections
	if !refuse {
		s.served++
	}
	s.mu.Unlock()
	if refuse {
		go s.refuse(c)
		return
	}
	go s.serveConn(c)
}

// forget closes c and drops it from the server's connections.
func (s *Server) forget(c net.Conn, served bool) {
	c.Close()
	s.mu.Lock()
	delete(s.conns, c)
	if served {
		s.served--
	}
	s.mu.Unlock()
	s.wg.Done()
}

// refuse answers a connection beyond MaxConnections with one error reply
// (id null: no request was read) and closes it.
func (s *Server) refuse(c net.Conn) {
	defer s.forget(c, false)
	s.log.Warn("rpc: connection refused: the connection limit is reached", "max_connections", s.opts.MaxConnections)
	c.SetDeadline(time.Now().Add(refuseLinger))
	msg := fmt.Sprintf("Server busy: %d connections are open, the limit; try again later", s.opts.MaxConnections)
	if _, err := c.Write(encodeReply(errorReply(nullID, &Error{Code: CodeServerBusy, Message: msg}))); err != nil {
		return
	}
	// Let the client finish writing its request, then close: a client
	// whose write fails may never read the reply.
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	io.Copy(io.Discard, io.LimitReader(c, int64(s.opts.MaxRequestBytes)))
}

// Close stops accepting, closes every connection, cancels the context of
// running handlers and waits for them to return. Replies not yet written
// are lost. A socket made by Listen is removed.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.wg.Wait()
		return nil
	}
	s.closed = true
	lns := make([]net.Listener, 0, len(s.listeners))
	for ln := range s.listeners {
		lns = append(lns, ln)
	}
	conns := make([]net.Conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()

	s.cancel()
	var first error
	for _, ln := range lns {
		if err := ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) && first == nil {
			first = fmt.Errorf("rpc: close %s: %w", ln.Addr(), err)
		}
	}
	for _, c := range conns {
		c.Close()
	}
	s.wg.Wait()
	return first
}

// serveConn reads requests from c and answers them one at a time, in order,
// until the client closes, sends bytes that are not JSON or too many of
// them, or stops reading replies.
func (s *Server) serveConn(c net.Conn) {
	defer s.forget(c, true)
	in := &budgetReader{r: c}
	dec := json.NewDecoder(in)
	for {
		// The decoder may hold bytes of this request read with the last
		// one; they count against this request's budget.
		in.left = s.opts.MaxRequestBytes
		if b, ok := dec.Buffered().(interface{ Len() int }); ok {
			in.left -= b.Len()
		}
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			s.readFailed(c, err)
			return
		}
		reply := s.handle(raw)
		if reply == nil {
			continue // notifications only
		}
		c.SetWriteDeadline(time.Now().Add(s.opts.WriteTimeout))
		if _, err := c.Write(reply); err != nil {
			s.log.Warn("rpc: reply not written (client not reading?); connection closed", "err", err)
			return
		}
	}
}

// readFailed ends a connection whose next request could not be read,
// telling the client why when the fault is in what it sent.
func (s *Server) readFailed(c net.Conn, err error) {
	var msg string
	var syntax *json.SyntaxError
	switch {
	case errors.Is(err, io.EOF):
		return // closed between requests: the normal end
	case errors.Is(err, errRequestTooLarge):
		msg = fmt.Sprintf("Parse error: request larger than %d bytes", s.opts.MaxRequestBytes)
	case errors.As(err, &syntax):
		msg = "Parse error: " + syntax.Error()
	case errors.Is(err, io.ErrUnexpectedEOF):
		msg = "Parse error: the connection was closed inside a request"
	default:
		s.log.Debug("rpc: connection read failed", "err", err)
		return
	}
	s.log.Warn("rpc: connection closed after a parse error", "err", msg)
	c.SetWriteDeadline(time.Now().Add(s.opts.WriteTimeout))
	c.Write(encodeReply(errorReply(nullID, &Error{Code: CodeParseError, Message: msg})))
}

// errRequestTooLarge is returned by budgetReader when a request runs past
// Options.MaxRequestBytes.
var errRequestTooLarge = errors.New("rpc: request too large")

// budgetReader reads at most left bytes, then fails with
// errRequestTooLarge, so that a huge request costs at most left bytes of
// memory before it is refused.
type budgetReader struct {
	r    io.Reader
	left int
}

func (b *budgetReader) Read(p []byte) (int, error) {
	if b.left <= 0 {
		return 0, errRequestTooLarge
	}
	if len(p) > b.left {
		p = p[:b.left]
	}
	n, err := b.r.Read(p)
	b.left -= n
	return n, err
}

// reply is one JSON-RPC response object. Exactly one of Result and Error is
// set; Result holds at least "null".
type reply struct {
	JSONRPC string          `json:"jsonrpc"`
	ID      json.RawMessage `json:"id"`
	Result  json.RawMessage `json:"result,omitempty"`
	Error   *Error          `json:"error,omitempty"`
}

var nullID = json.RawMessage("null")

func errorReply(id json.RawMessage, e *Error) *reply {
	return &reply{JSONRPC: "2.0", ID: id, Error: e}
}

// encodeReply writes v as one line of JSON. v holds only raw JSON that was
// parsed or produced by encoding/json, and strings, so it always encodes.
func encodeReply(v any) []byte {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		panic(fmt.Sprintf("rpc: reply does not encode: %v", err))
	}
	return b.Bytes()
}

// handle answers one JSON value from the stream: a request object or a
// batch array. It returns nil when nothing is to be sent.
func (s *Server) handle(raw json.RawMessage) []byte {
	raw = bytes.TrimLeft(raw, " \t\r\n")
	if len(raw) > 0 && raw[0] == '[' {
		var batch []json.RawMessage
		if err := json.Unmarshal(raw, &batch); err != nil {
			// Cannot happen: the decoder has parsed raw as an array.
			return encodeReply(errorReply(nullID, &Error{Code: CodeInternalError, Message: "Internal error: " + err.Error()}))
		}
		if len(batch) == 0 {
			return encodeReply(errorReply(nullID, &Error{Code: CodeInvalidRequest, Message: "Invalid request: empty batch"}))
		}
		var replies []*reply
		for _, r := range batch {
			if rep := s.call(r); rep != nil {
				replies = append(replies, rep)
			}
		}
		if len(replies) == 0 {
			return nil
		}
		return encodeReply(replies)
	}
	if rep := s.call(raw); rep != nil {
		return encodeReply(rep)
	}
	return nil
}

// requestMembers are the members a request may have.
var requestMembers = map[string]bool{"jsonrpc": true, "method": true, "params": true, "id": true}

// call answers one request; nil for a notification.
func (s *Server) call(raw json.RawMessage) *reply {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil || m == nil {
		return errorReply(nullID, &Error{Code: CodeInvalidRequest, Message: "Invalid request: not an object"})
	}
	id, hasID := m["id"]
	if hasID {
		switch firstByte(id) {
		case '"', 'n', '-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9':
		default:
			return errorReply(nullID, &Error{Code: CodeInvalidRequest, Message: `Invalid request: "id" must be a string, a number or null`})
		}
	} else {
		id = nullID // for the errors a notification still gets
	}
	invalid := func(msg string) *reply {
		return errorReply(id, &Error{Code: CodeInvalidRequest, Message: "Invalid request: " + msg})
	}
	var unknown []string
	for k := range m {
		if !requestMembers[k] {
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return invalid(fmt.Sprintf("unknown member %q", unknown[0]))
	}
	var version, method string
	if v, ok := m["jsonrpc"]; !ok || json.Unmarshal(v, &version) != nil || version != "2.0" {
		return invalid(`"jsonrpc" must be "2.0"`)
	}
	if v, ok := m["method"]; !ok || json.Unmarshal(v, &method) != nil {
		return invalid(`"method" must be a string`)
	}
	params := m["params"]
	switch firstByte(params) {
	case 0, '{', '[':
	case 'n':
		params = nil // null is no params, as in SPDK
	default:
		return invalid(`"params" must be an object or an array`)
	}

	h := s.handler(method)
	if h == nil {
		if !hasID {
			return nil
		}
		return errorReply(id, &Error{Code: CodeMethodNotFound, Message: fmt.Sprintf("Method not found: %q", method)})
	}
	result, e := s.invoke(method, h, params)
	if !hasID {
		return nil
	}
	if e != nil {
		return errorReply(id, e)
	}
	return &reply{JSONRPC: "2.0", ID: id, Result: result}
}

// invoke runs h and encodes what it returns. A panic in the handler (or in
// its result's MarshalJSON, or its error's Error) is logged and becomes an
// internal error: one broken method must not take the target down.
func (s *Server) invoke(method string, h Handler, params json.RawMessage) (result json.RawMessage, e *Error) {
	defer func() {
		if p := recover(); p != nil {
			s.log.Error("rpc: method panicked", "method", method, "panic", p, "stack", string(debug.Stack()))
			result, e = nil, &Error{Code: CodeInternalError, Message: fmt.Sprintf("Internal error: method %s panicked", method)}
		}
	}()
	res, err := h(s.ctx, params)
	if err != nil {
		return nil, toError(err)
	}
	b, err := json.Marshal(res)
	if err != nil {
		return nil, &Error{Code: CodeInternalError, Message: fmt.Sprintf("Internal error: result of %s does not encode: %v", method, err)}
	}
	return b, nil
}

// toError turns a handler's error into the error object sent: an *Error in
// the chain gives the code, and the whole chain's text the message (so a
// handler may wrap an *Error with context).
func toError(err error) *Error {
	var e *Error
	if errors.As(err, &e) && e != nil {
		return &Error{Code: e.Code, Message: err.Error()}
	}
	return &Error{Code: CodeInternalError, Message: err.Error()}
}

func firstByte(b []byte) byte {
	b = bytes.TrimLeft(b, " \t\r\n")
	if len(b) == 0 {
		return 0
	}
	return b[0]
}
