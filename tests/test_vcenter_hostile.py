"""Hostile vCenter answers driven through the client's injectable transport (what
tests/test_vcenter_client.py does not already cover): fuzzed bodies and statuses give a
typed error, never another exception; a listing that repeats its page forever or holds a
million entries ends in bounded time and memory."""

from __future__ import annotations

import json
import resource
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guestfs_mount.errors import GuestfsError, ProtocolError
from tests.fake_vcenter import FakeVCenter, make_client

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)
bodies = json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200)
statuses = st.sampled_from([200, 201, 204, 302, 400, 401, 403, 404, 500, 503])


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    op=st.sampled_from(["files.get", "files.list", "transfer.create"]), status=statuses, body=bodies
)
async def test_fuzzed_answers_give_typed_errors(op: str, status: int, body: bytes) -> None:
    fake = FakeVCenter()
    fake.stats["/f"] = {"type": "FILE", "size": 1}
    fake.files["/d"] = []
    fake.contents["/f"] = b"x"

    async def hook(req: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body)

    fake.hooks[op] = hook
    async with make_client(fake, retry_budget=0.0) as c:
        try:
            if op == "files.get":
                await c.stat("vm-42", "/f")
            elif op == "files.list":
                await c.list_dir("vm-42", "/d")
            else:
                await c.create_transfer("vm-42", "/f")
        except GuestfsError:
            pass  # typed: the FUSE layer maps it to an errno


async def test_listing_repeating_the_same_page_forever_ends() -> None:
    fake = FakeVCenter()
    page = [{"filename": f"f{i}", "type": "FILE", "size": 1} for i in range(100)]

    async def same(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"files": page, "total": 10**9, "status": "READY"})

    fake.hooks["files.list"] = same
    t0 = time.monotonic()
    async with make_client(fake, max_list_entries=5000, list_page_size=100) as c:
        with pytest.raises(ProtocolError):
            await c.list_dir("vm-42", "/d")
    assert time.monotonic() - t0 < 20
    assert len(fake.requests) < 200


async def test_million_entries_bounded_time_and_memory() -> None:
    fake = FakeVCenter()
    calls = [0]

    async def endless(req: httpx.Request) -> httpx.Response:
        i = json.loads(req.content)["iteration"]["index"]
        calls[0] += 1
        files = [{"filename": f"e{i + k:08d}", "type": "FILE", "size": 1} for k in range(1000)]
        return httpx.Response(200, json={"files": files, "total": 10**7, "status": "READY"})

    fake.hooks["files.list"] = endless
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    async with make_client(fake, max_list_entries=1_000_000, list_page_size=1000) as c:
        with pytest.raises(ProtocolError, match="more than"):
            await c.list_dir("vm-42", "/d")
    fake.requests.clear()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert time.monotonic() - t0 < 60
    assert calls[0] <= 1002
    assert grown_kib < 1536 * 1024, f"peak RSS grew by {grown_kib} KiB"
