package rpc

import (
	"fmt"
	"syscall"
	"unicode"
	"unicode/utf8"
)

// JSON-RPC 2.0 error codes (jsonrpc.org/specification §5.1), as SPDK's
// server sends them (doc/jsonrpc.md, include/spdk/jsonrpc.h).
const (
	// CodeParseError: the bytes are not JSON, or a request is larger than
	// Options.MaxRequestBytes (SPDK counts "request is too long" as a parse
	// error too). The connection is closed after the reply: a JSON stream
	// has no point to resynchronise at.
	CodeParseError = -32700
	// CodeInvalidRequest: JSON, but not a request object.
	CodeInvalidRequest = -32600
	// CodeMethodNotFound: no handler is registered under the method name.
	CodeMethodNotFound = -32601
	// CodeInvalidParams: the handler refused its parameters.
	CodeInvalidParams = -32602
	// CodeInternalError: the handler failed with an error that carries no
	// code of its own, or panicked.
	CodeInternalError = -32603
	// CodeServerBusy is in the range the specification leaves to servers
	// (-32000 to -32099): the connection limit was reached.
	CodeServerBusy = -32000
)

// Error is a JSON-RPC error object. A handler that returns one (or an error
// wrapping one) sends its code; any other handler error is sent as
// CodeInternalError with the error's text. Client.Call returns the errors
// the server sends as *Error.
type Error struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
}

// Error returns the message alone; the code is for programs.
func (e *Error) Error() string {
	if e == nil {
		return "<nil>"
	}
	return e.Message
}

// Errorf returns an error with code and a formatted message.
func Errorf(code int, format string, a ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, a...)}
}

// InvalidParamsf returns a CodeInvalidParams error; the message should name
// the parameter and what is wrong with it.
func InvalidParamsf(format string, a ...any) *Error {
	return Errorf(CodeInvalidParams, format, a...)
}

// Errno returns the error an SPDK handler sends for errno e: code -e and
// strerror(e) as the message ("No such device" for ENODEV). Orchestration
// written against SPDK tells "already exists" (-17, EEXIST) from "no such
// device" (-19, ENODEV) from "busy" (-16, EBUSY) by these codes.
func Errno(e syscall.Errno) *Error {
	return &Error{Code: -int(e), Message: strerror(e)}
}

// Errnof is Errno with a message naming what failed, which is what a person
// reading the error needs: Errnof(syscall.ENODEV, "bdev %q does not exist", name).
func Errnof(e syscall.Errno, format string, a ...any) *Error {
	return &Error{Code: -int(e), Message: fmt.Sprintf(format, a...)}
}

// strerror is C's strerror text: Go's errno strings are C's with the first
// letter lowered.
func strerror(e syscall.Errno) string {
	s := e.Error()
	r, n := utf8.DecodeRuneInString(s)
	if n == 0 {
		return s
	}
	return string(unicode.ToUpper(r)) + s[n:]
}
