package config

import (
	"errors"
	"fmt"
	"strconv"
)

// errorList collects configuration errors, each prefixed with the source,
// the entry ("controller[1] \"vhost.1\"") and the key path. It reports at most
// one error per key path of an entry: the first problem found with a field is
// the one worth reading, and later checks on the same field (say "required"
// after "must be greater than 0") only repeat it.
type errorList struct {
	source string
	prefix string // "" or `bdev[0] "mem0": `
	shared *errorState
}

type errorState struct {
	errs []error
	seen map[string]bool
}

func newErrorList(source string) *errorList {
	return &errorList{source: source, shared: &errorState{seen: map[string]bool{}}}
}

// entry returns a list that prefixes errors with kind[index] and the entry's
// name, when it has one.
func (l *errorList) entry(kind string, index int, name string) *errorList {
	e := kind + "[" + strconv.Itoa(index) + "]"
	if name != "" {
		e += " " + strconv.Quote(name)
	}
	return &errorList{source: l.source, prefix: e + ": ", shared: l.shared}
}

// addf records an error about key ("" for the entry itself).
func (l *errorList) addf(key, format string, args ...any) {
	path := l.prefix + key
	if key != "" && l.shared.seen[path] {
		return
	}
	l.shared.seen[path] = true
	msg := fmt.Sprintf(format, args...)
	if key != "" {
		msg = key + ": " + msg
	}
	l.shared.errs = append(l.shared.errs, errors.New(l.source+": "+l.prefix+msg))
}

// has reports whether an error about key of this entry was recorded.
func (l *errorList) has(key string) bool {
	return l.shared.seen[l.prefix+key]
}

// err joins the errors, one per line, or is nil if there are none.
func (l *errorList) err() error {
	return errors.Join(l.shared.errs...)
}
