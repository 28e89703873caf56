"""A BodyWriter that keeps a download in memory, for the vcenter layer's tests: the body
still takes the production path (the worker thread of vcenter/transfer.py writes it)."""

from __future__ import annotations

import threading


class MemoryWriter:
    def __init__(self) -> None:
        self.body = bytearray()
        self.writes: list[int] = []  # size of each write, in order
        self.reported: list[int] = []  # each "stored up to n" the event loop was told
        self.loop_thread = threading.get_ident()  # made on the loop
        self.writer_threads: set[int] = set()

    @property
    def data(self) -> bytes:
        return bytes(self.body)

    def write(self, data: bytes, offset: int) -> None:
        assert offset == len(self.body), f"write at {offset}, {len(self.body)} stored"
        self.writer_threads.add(threading.get_ident())
        self.body += data
        self.writes.append(len(data))

    def stored(self, nbytes: int) -> None:
        assert threading.get_ident() == self.loop_thread, "stored() must run on the loop"
        assert nbytes <= len(self.body)
        self.reported.append(nbytes)
