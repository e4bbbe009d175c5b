package virtq

// NeedEvent exposes the EVENT_IDX window test for its table test.
var NeedEvent = needEvent
