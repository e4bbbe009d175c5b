package rpc

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"reflect"
	"strconv"
	"strings"
)

// DecodeParams decodes a request's params into v (a pointer) strictly, as
// SPDK's spdk_json_decode_object does: a key v has no field for is refused
// (`unknown parameter "foo"`), keys match field names exactly (encoding/json
// alone would take "NAME" for "name"), and a value of the wrong type is
// refused naming the key and the type wanted. Absent or null params decode
// as {}. Every error is an *Error with CodeInvalidParams.
//
// Whether required parameters are present is for the handler to check;
// DecodeParams cannot tell an absent key from a zero value.
func DecodeParams(raw json.RawMessage, v any) error {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		raw = json.RawMessage("{}")
	}
	if rv := reflect.ValueOf(v); rv.Kind() != reflect.Pointer || rv.IsNil() {
		// A handler bug, reported as such rather than as the client's fault.
		return &Error{Code: CodeInternalError, Message: fmt.Sprintf("Internal error: DecodeParams into %T, not a pointer", v)}
	}
	if err := checkKeys(raw, reflect.TypeOf(v), ""); err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return paramsError(err, reflect.TypeOf(v))
	}
	if _, err := dec.Token(); err == nil {
		return InvalidParamsf("params: more than one JSON value")
	}
	return nil
}

// paramsError turns an encoding/json error from decoding into t into a
// -32602 error that names the parameter.
func paramsError(err error, t reflect.Type) error {
	var e *Error
	if errors.As(err, &e) {
		return e // from a parameter type's own UnmarshalJSON
	}
	var typeErr *json.UnmarshalTypeError
	var syntaxErr *json.SyntaxError
	switch {
	case errors.As(err, &typeErr):
		if typeErr.Field == "" {
			return InvalidParamsf("params must be %s, not %s", want(typeErr.Type), got(typeErr.Value))
		}
		return InvalidParamsf("parameter %q must be %s, not %s", jsonPath(t, typeErr.Field), want(typeErr.Type), got(typeErr.Value))
	case errors.As(err, &syntaxErr):
		return InvalidParamsf("params are not valid JSON: %v", syntaxErr)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return InvalidParamsf("params are not valid JSON: they end inside a value")
	}
	if name, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
		return InvalidParamsf("unknown parameter %s", name)
	}
	return InvalidParamsf("invalid params: %v", err)
}

// jsonPath drops from encoding/json's dotted field path the names of
// embedded structs, which are Go's and not keys the client sent.
func jsonPath(t reflect.Type, field string) string {
	var keys []string
	for _, part := range strings.Split(field, ".") {
		t = elemType(t)
		if t.Kind() == reflect.Struct {
			if f, ok := t.FieldByName(part); ok && f.Anonymous && f.Tag.Get("json") == "" {
				t = f.Type
				continue // an embedded struct: no key of its own
			}
			fields := map[string]reflect.Type{}
			jsonFields(t, fields)
			if ft, ok := fields[part]; ok {
				t = ft
			}
		}
		keys = append(keys, part)
	}
	return strings.Join(keys, ".")
}

// elemType strips pointers, and arrays, slices and maps down to their
// elements: the type a path's next key names a field of.
func elemType(t reflect.Type) reflect.Type {
	for {
		switch t.Kind() {
		case reflect.Pointer, reflect.Slice, reflect.Array, reflect.Map:
			t = t.Elem()
		default:
			return t
		}
	}
}

// want says in JSON's words what a Go type accepts.
func want(t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Bool:
		return "true or false"
	case reflect.Int8, reflect.Int16, reflect.Int32:
		lo := -1 << (t.Bits() - 1)
		return fmt.Sprintf("an integer from %d to %d", lo, -lo-1)
	case reflect.Int, reflect.Int64:
		return "an integer"
	case reflect.Uint8, reflect.Uint16, reflect.Uint32:
		return fmt.Sprintf("an integer from 0 to %d", uint64(math.MaxUint64)>>(64-t.Bits()))
	case reflect.Uint, reflect.Uint64, reflect.Uintptr:
		return "a non-negative integer"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.String:
		return "a string"
	case reflect.Slice, reflect.Array:
		return "an array"
	case reflect.Map, reflect.Struct:
		return "an object"
	}
	return "a " + t.String()
}

// got names what encoding/json found: "string", "number", "number -1",
// "bool", "array", "object".
func got(value string) string {
	switch value {
	case "string":
		return "a string"
	case "number":
		return "a number"
	case "bool":
		return "a boolean"
	case "array":
		return "an array"
	case "object":
		return "an object"
	}
	if n, ok := strings.CutPrefix(value, "number "); ok {
		return n
	}
	return value
}

var unmarshalerType = reflect.TypeFor[json.Unmarshaler]()

// checkKeys refuses an object key that names no field of t exactly,
// descending into nested objects and arrays; path prefixes the key in the
// error ("luns[0].bdev"). Values of the wrong shape are left to the decoder,
// which reports them.
func checkKeys(raw json.RawMessage, t reflect.Type, path string) error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t.Implements(unmarshalerType) || reflect.PointerTo(t).Implements(unmarshalerType) {
		return nil // the type decodes itself
	}
	switch t.Kind() {
	case reflect.Struct:
		keys, values, ok := objectMembers(raw)
		if !ok {
			return nil
		}
		fields := map[string]reflect.Type{}
		jsonFields(t, fields)
		for i, k := range keys {
			ft, ok := fields[k]
			if !ok {
				return InvalidParamsf("unknown parameter %q", path+k)
			}
			if err := checkKeys(values[i], ft, path+k+"."); err != nil {
				return err
			}
		}
	case reflect.Map:
		keys, values, ok := objectMembers(raw)
		if !ok {
			return nil
		}
		for i, k := range keys {
			if err := checkKeys(values[i], t.Elem(), path+k+"."); err != nil {
				return err
			}
		}
	case reflect.Slice, reflect.Array:
		var elems []json.RawMessage
		if json.Unmarshal(raw, &elems) != nil {
			return nil
		}
		prefix := strings.TrimSuffix(path, ".")
		for i, e := range elems {
			if err := checkKeys(e, t.Elem(), prefix+"["+strconv.Itoa(i)+"]."); err != nil {
				return err
			}
		}
	}
	return nil
}

// jsonFields adds the JSON names of t's fields, as encoding/json names them,
// to fields; embedded structs add theirs unless a name is taken.
func jsonFields(t reflect.Type, fields map[string]reflect.Type) {
	var embedded []reflect.Type
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag := f.Tag.Get("json")
		if tag == "-" {
			continue
		}
		name, _, _ := strings.Cut(tag, ",")
		ft := f.Type
		if f.Anonymous && name == "" {
			et := ft
			if et.Kind() == reflect.Pointer {
				et = et.Elem()
			}
			if et.Kind() == reflect.Struct {
				embedded = append(embedded, et)
				continue
			}
		}
		if !f.IsExported() {
			continue
		}
		if name == "" {
			name = f.Name
		}
		fields[name] = ft
	}
	for _, et := range embedded {
		inner := map[string]reflect.Type{}
		jsonFields(et, inner)
		for k, v := range inner {
			if _, taken := fields[k]; !taken {
				fields[k] = v
			}
		}
	}
}

// objectMembers returns raw's keys in order with their values; ok is false
// when raw is not a JSON object.
func objectMembers(raw json.RawMessage) (keys []string, values []json.RawMessage, ok bool) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, nil, false
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, nil, false
		}
		k, _ := tok.(string)
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, nil, false
		}
		keys = append(keys, k)
		values = append(values, v)
	}
	return keys, values, true
}
