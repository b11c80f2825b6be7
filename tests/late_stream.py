"""A copy stream for tests: copies land late, and only when something waits for them.

``LateStream`` implements :class:`kvstore.transfer.CopyStream` on the CPU with the ordering
rules of a CUDA copy stream, played as late as they allow:

* at submit, the copy's destination is poisoned (NaN) and nothing else happens;
* ``event.wait()`` (the compute stream waits for the copy) runs the copy's read of its source
  and lands a device-memory destination; a host-memory destination stays poisoned, because a
  stream wait tells the CPU nothing;
* ``event.wait(reads_host=True)`` (a kernel that reads host memory in place waits) and
  ``event.synchronize()`` / ``stream.synchronize()`` (the host blocks) land everything;
* copies run in submit order (FIFO, as one stream does): before a copy reads, every earlier
  copy has landed, and waiting for a copy completes every copy before it.

So a read of a pool that does not wait for the copy into it sees NaN, a write of a copy's
source before the copy was waited for changes what the copy moves, and a late copy into a slot
that was meanwhile reused overwrites the new content: each ordering bug a GPU would show at
random shows here every time.
"""

from __future__ import annotations

from kvstore.transfer import CopyStream, StreamOp


class _Entry:
    __slots__ = ("op", "payload", "read", "landed")

    def __init__(self, op: StreamOp) -> None:
        self.op = op
        self.payload = None
        self.read = False
        self.landed = False


class LateEvent:
    """The event of one late copy (the interface of kvstore.transfer's CUDA events)."""

    __slots__ = ("stream", "index")

    def __init__(self, stream: "LateStream", index: int) -> None:
        self.stream = stream
        self.index = index

    def wait(self, *, reads_host: bool = False) -> None:
        self.stream._complete(self.index, host=reads_host)

    def synchronize(self) -> None:
        self.stream._complete(self.index, host=True)

    def query(self) -> bool:
        return self.stream._entries[self.index].landed


class LateStream(CopyStream):
    """See the module docstring."""

    asynchronous = True

    def __init__(self) -> None:
        self._entries: list[_Entry] = []
        self._first_unread = 0  # every copy before it has read its source
        self._first_unlanded = 0  # every copy before it has landed
        self.submitted = 0

    def submit(self, op: StreamOp) -> LateEvent:
        op.poison()
        self._entries.append(_Entry(op))
        self.submitted += 1
        return LateEvent(self, len(self._entries) - 1)

    def synchronize(self) -> None:
        if self._entries:
            self._complete(len(self._entries) - 1, host=True)

    def _land(self, entry: _Entry) -> None:
        if entry.read and not entry.landed:
            entry.op.write(entry.payload)
            entry.payload = None
            entry.landed = True

    def _land_range(self, stop: int, *, host: bool) -> None:
        """Land the read copies before ``stop`` (host-memory ones only when ``host``)."""
        entries = self._entries
        for i in range(self._first_unlanded, stop):
            if host or not entries[i].op.host_dst:
                self._land(entries[i])
        while self._first_unlanded < len(entries) and entries[self._first_unlanded].landed:
            self._first_unlanded += 1

    def _complete(self, index: int, *, host: bool) -> None:
        entries = self._entries
        for i in range(self._first_unread, index + 1):
            self._land_range(i, host=True)  # stream order: what came before has landed
            entries[i].payload = entries[i].op.read()
            entries[i].read = True
            self._first_unread = i + 1
        self._land_range(index + 1, host=host)

    @property
    def pending(self) -> int:
        """Copies not landed yet."""
        return sum(not e.landed for e in self._entries[self._first_unlanded :])
