package virtq

// NeedEvent exposes the EVENT_IDX window test for its table test.
var NeedEvent = needEvent

// Crash points for the inflight tests. Each runs one operation with only its first `stores` stores to the
// inflight region (and, for PublishCrash, to used->idx) and stops there, as a process killed at that instruction
// would; the Queue is then abandoned and a new one built on the same memory, as the next process does.

// PopCrash is Pop making the first stores of its two region stores (counter, inflight flag). No heads may be
// waiting to run again.
func (q *Queue) PopCrash(c *Chain, stores int) (bool, error) {
	f := q.inf
	q.inf = nil
	ok, err := q.Pop(c)
	q.inf = f
	head := c.Head
	if ce, isChain := err.(*ChainError); isChain {
		head = ce.Head
	} else if !ok {
		return ok, err
	}
	if stores >= 1 {
		f.storeCounter(head)
	}
	if stores >= 2 {
		f.storeTaken(head)
	}
	return ok, err
}

// PushCrash is Push making the first stores of its two region stores (next, last_batch_head). It must not
// need to flush (fewer than Size elements pending).
func (q *Queue) PushCrash(head uint16, written uint32, stores int) {
	f := q.inf
	q.inf = nil
	q.Push(head, written)
	q.inf = f
	if stores >= 1 {
		f.storeNext(head)
	}
	if stores >= 2 {
		f.storeBatchHead(head)
	}
}

// PublishCrash is Publish making its first stores: used->idx, then the flags of the batch one by one, then
// used_idx (n+2 stores for a batch of n).
func (q *Queue) PublishCrash(stores int) {
	n := int(q.pending)
	q.usedIdx += q.pending
	q.pending = 0
	if stores >= 1 {
		q.storeUsedWord()
		q.inf.clearBatch(n, stores-1, q.mask)
	}
	if stores >= n+2 {
		q.inf.storeUsedIdx(q.usedIdx)
	}
}

// ResubmitsLeft counts the recovered heads Pop has not returned yet.
func (q *Queue) ResubmitsLeft() int {
	if q.inf == nil {
		return 0
	}
	return len(q.inf.resubmit) - q.inf.resubmitNext
}
