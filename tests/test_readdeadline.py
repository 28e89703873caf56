"""The deadline shared by the FUSE read requests of one read(2) (readdeadline), on the
request patterns the kernel sends (seen with --debug on a trickling body)."""

from __future__ import annotations

from guestfs_mount.readdeadline import GAP, GRACE, PAGE, Outcome, ReadChain

T = 3.0
KiB = 1024


def test_read_ahead_batch_and_page_by_page_retry_share_one_deadline() -> None:
    c = ReadChain(T)
    a = c.begin(0, 128 * KiB, now=0.0)
    b = c.begin(128 * KiB, 128 * KiB, now=0.5)  # more read-ahead while the first waits
    assert a.deadline == b.deadline == T
    c.end(a, Outcome.TIMEOUT, now=T)
    c.end(b, Outcome.TIMEOUT, now=T)
    # The kernel retries the first page, then asks page by page: what is on disk only.
    for i in range(4):
        r = c.begin(i * PAGE, PAGE, now=T + 0.001 * (i + 1))
        assert r.expired and r.deadline <= T + 0.01 + GRACE
        c.end(r, Outcome.OK, now=T + 0.001 * (i + 1))
    # The first page not there yet ends this read(2); the next request is a new one.
    r = c.begin(4 * PAGE, PAGE, now=T + 0.01)
    c.end(r, Outcome.TIMEOUT, now=r.deadline)
    fresh = c.begin(4 * PAGE, PAGE, now=r.deadline + 0.001)
    assert not fresh.expired and fresh.deadline == r.deadline + 0.001 + T


def test_sequential_pages_that_each_arrive_in_time_still_share_the_deadline() -> None:
    c = ReadChain(T)
    now, deadlines = 0.0, set()
    for i in range(40):  # 0.2 s each: 8 s in all, which one --timeout of its own each allowed
        r = c.begin(i * PAGE, PAGE, now=now)
        deadlines.add(r.deadline)
        now += 0.2
        c.end(r, Outcome.OK if now < r.deadline else Outcome.TIMEOUT, now=min(now, r.deadline))
        if now >= T:
            break
    assert deadlines == {T}


def test_lone_page_timeout_or_an_error_or_a_pause_starts_a_new_chain() -> None:
    c = ReadChain(T)
    r = c.begin(0, PAGE, now=0.0)
    c.end(r, Outcome.TIMEOUT, now=T)  # a sync page read: the kernel returns the read(2)
    assert c.begin(0, PAGE, now=T + 0.001).deadline == T + 0.001 + T

    c = ReadChain(T)
    r = c.begin(0, PAGE, now=0.0)
    c.end(r, Outcome.ERROR, now=1.0)
    assert c.begin(PAGE, PAGE, now=1.001).deadline == 1.001 + T

    c = ReadChain(T)
    r = c.begin(0, PAGE, now=0.0)
    c.end(r, Outcome.OK, now=1.0)
    assert c.begin(PAGE, PAGE, now=1.0 + 2 * GAP).deadline == 1.0 + 2 * GAP + T


def test_a_read_elsewhere_in_the_file_starts_a_new_chain() -> None:
    c = ReadChain(T)
    r = c.begin(0, PAGE, now=0.0)
    c.end(r, Outcome.OK, now=1.0)
    assert c.begin(10 * PAGE, PAGE, now=1.001).deadline == 1.001 + T  # a seek forward
    c2 = ReadChain(T)
    c2.begin(10 * PAGE, PAGE, now=0.0)
    assert c2.begin(0, PAGE, now=0.5).deadline == 0.5 + T  # before the chain: another reader


def test_a_request_of_an_older_chain_does_not_disturb_the_new_one() -> None:
    c = ReadChain(T)
    old = c.begin(0, PAGE, now=0.0)
    new = c.begin(100 * PAGE, PAGE, now=0.1)  # a second reader of the same open file
    c.end(old, Outcome.ERROR, now=0.2)
    joined = c.begin(101 * PAGE, PAGE, now=0.25)  # while `new` waits: same chain
    assert joined.deadline == new.deadline == 0.1 + T
