package rpc

// Goal: DecodeParams refuses what SPDK's strict object decoder refuses, with
// a message naming the parameter, and accepts absent or null params as {}.
// Method: a table of params against one parameter struct of every shape.

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

type lunParams struct {
	Target uint8  `json:"scsi_target_num"`
	Bdev   string `json:"bdev_name"`
}

type common struct {
	Name string `json:"name"`
}

type testParams struct {
	common
	NumBlocks uint64            `json:"num_blocks"`
	BlockSize int32             `json:"block_size"`
	Readonly  *bool             `json:"readonly,omitempty"`
	Ratio     float64           `json:"ratio"`
	LUNs      []lunParams       `json:"luns"`
	Labels    map[string]string `json:"labels"`
	Nested    *lunParams        `json:"nested"`
	Raw       json.RawMessage   `json:"raw"`
	Skipped   int               `json:"-"`
	Untagged  int
	hidden    int
}

func TestDecodeParams(t *testing.T) {
	rows := []struct {
		params string
		err    string // "" = accepted
	}{
		{params: ``},
		{params: `null`},
		{params: `{}`},
		{params: `{"name":"m0","num_blocks":2048,"block_size":512,"readonly":true,"ratio":0.5,
			"luns":[{"scsi_target_num":0,"bdev_name":"m0"}],"labels":{"a":"b"},"nested":null,"raw":{"any":[1]},"Untagged":1}`},
		{params: `{"foo":1}`, err: `unknown parameter "foo"`},
		{params: `{"name":"m0","NAME":"m1"}`, err: `unknown parameter "NAME"`},
		{params: `{"Name":"m0"}`, err: `unknown parameter "Name"`},
		{params: `{"Skipped":1}`, err: `unknown parameter "Skipped"`},
		{params: `{"hidden":1}`, err: `unknown parameter "hidden"`},
		{params: `{"luns":[{"scsi_target_num":0},{"bdev":"x"}]}`, err: `unknown parameter "luns[1].bdev"`},
		{params: `{"nested":{"lun":1}}`, err: `unknown parameter "nested.lun"`},
		{params: `{"num_blocks":"2048"}`, err: `parameter "num_blocks" must be a non-negative integer, not a string`},
		{params: `{"num_blocks":-1}`, err: `parameter "num_blocks" must be a non-negative integer, not -1`},
		{params: `{"num_blocks":1.5}`, err: `parameter "num_blocks" must be a non-negative integer, not 1.5`},
		{params: `{"block_size":4294967296}`, err: `parameter "block_size" must be an integer from -2147483648 to 2147483647, not 4294967296`},
		{params: `{"luns":[{"scsi_target_num":256}]}`, err: `parameter "luns.scsi_target_num" must be an integer from 0 to 255, not 256`},
		{params: `{"name":7}`, err: `parameter "name" must be a string, not a number`},
		{params: `{"readonly":"yes"}`, err: `parameter "readonly" must be true or false, not a string`},
		{params: `{"luns":{}}`, err: `parameter "luns" must be an array, not an object`},
		{params: `{"labels":[]}`, err: `parameter "labels" must be an object, not an array`},
		{params: `{"ratio":true}`, err: `parameter "ratio" must be a number, not a boolean`},
		{params: `[1,2]`, err: `params must be an object, not an array`},
		{params: `{"name":`, err: `not valid JSON`},
		{params: `{} {}`, err: `more than one JSON value`},
	}
	for _, row := range rows {
		var p testParams
		err := DecodeParams(json.RawMessage(row.params), &p)
		if row.err == "" {
			if err != nil {
				t.Errorf("%s: %v", row.params, err)
			}
			continue
		}
		var e *Error
		if !errors.As(err, &e) || e.Code != CodeInvalidParams || !strings.Contains(e.Message, row.err) {
			t.Errorf("%s: %v, want a -32602 error containing %q", row.params, err, row.err)
		}
	}

	var p testParams
	if err := DecodeParams(json.RawMessage(`{"name":"m0","num_blocks":8,"luns":[{"scsi_target_num":3,"bdev_name":"b"}]}`), &p); err != nil {
		t.Fatal(err)
	}
	if p.Name != "m0" || p.NumBlocks != 8 || len(p.LUNs) != 1 || p.LUNs[0].Target != 3 || p.LUNs[0].Bdev != "b" {
		t.Fatalf("decoded %+v", p)
	}
	var e *Error
	if err := DecodeParams(nil, p); !errors.As(err, &e) || e.Code != CodeInternalError {
		t.Fatalf("non-pointer: %v", err)
	}
	var m map[string]any
	if err := DecodeParams(json.RawMessage(`{"anything":1}`), &m); err != nil || m["anything"] != 1.0 {
		t.Fatalf("map: %v %v", m, err)
	}
}
