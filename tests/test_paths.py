import os
import posixpath

from hypothesis import given
from hypothesis import strategies as st

from guestfs_mount.errors import NotFound
from guestfs_mount.model import FileType, GuestStat
from guestfs_mount.paths import (
    dotdot_after_name,
    is_safe_name,
    join,
    name_problem,
    normalize,
    parent_of,
    resolve_in_guest,
    rewrite_symlink,
)


def test_safe_names():
    for bad in ["", ".", "..", "a/b", "nul\0", "x" * 256]:
        assert not is_safe_name(bad)
    for good in ["a", "with space", "new\nline", "é" * 127, os.fsdecode(b"\xff\xfe"), "..."]:
        assert is_safe_name(good)


def test_name_problem_says_why():
    assert name_problem("ok") is None
    assert name_problem("..") == "not allowed"
    assert name_problem("a/b") == "contains '/' or NUL"
    assert name_problem("\ud800") == "cannot be encoded"  # JSON can say it, no guest byte can
    assert name_problem("x" * 300) == "is 300 bytes long"
    assert not is_safe_name("\ud800")


def test_join_and_parent():
    assert join("/", "a") == "/a"
    assert join("/a", "b") == "/a/b"
    assert parent_of("/a/b") == "/a"
    assert parent_of("/a") == "/"


def test_normalize_clamps_at_root():
    assert normalize("/../../etc/passwd") == "/etc/passwd"
    assert normalize("/a/./b//../c") == "/a/c"
    assert normalize("/") == "/"


def test_absolute_target_becomes_relative_inside():
    assert rewrite_symlink("/a/b/link", "/etc/passwd") == "../../etc/passwd"
    assert rewrite_symlink("/link", "/etc/passwd") == "etc/passwd"
    assert rewrite_symlink("/a/link", "/") == ".."
    assert rewrite_symlink("/link", "/") == "."


def test_relative_target_kept_when_inside():
    assert rewrite_symlink("/a/b/link", "../c") == "../c"
    assert rewrite_symlink("/a/link", "x/y") == "x/y"


def test_relative_target_climbing_out_is_clamped():
    # The guest kernel clamps at its root; on the host the same text would escape.
    assert rewrite_symlink("/a/link", "../../../etc/shadow") == "../etc/shadow"


segment = st.sampled_from(["a", "b", "..", ".", "", "c d"])


@given(
    link=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=4),
    target=st.lists(segment, max_size=8),
    absolute=st.booleans(),
)
def test_rewritten_target_never_leaves_the_mount(link, target, absolute):
    link_path = "/" + "/".join(link)
    text = ("/" if absolute else "") + "/".join(target)
    out = rewrite_symlink(link_path, text)
    if not out:
        return
    assert not out.startswith("/")
    # Resolve on a fake host mount at /mnt/x: it must stay under it.
    base = posixpath.join("/mnt/x", parent_of(link_path).lstrip("/"))
    resolved = posixpath.normpath(posixpath.join(base, out))
    assert resolved == "/mnt/x" or resolved.startswith("/mnt/x/")


def guest(links: dict[str, str]):
    """An async stat over a guest whose only symlinks are ``links``; "/gone" is missing."""

    async def stat(path: str) -> GuestStat:
        if path.startswith("/gone"):
            raise NotFound("gone", path=path)
        if path in links:
            return GuestStat(FileType.SYMLINK, 1, 0, 0, symlink_target=links[path])
        return GuestStat(FileType.DIRECTORY, 4096, 0, 0)

    return stat


async def test_resolve_in_guest_follows_a_symlink_before_dotdot():
    assert dotdot_after_name("s/../f") and not dotdot_after_name("../../f")
    # /x/s -> /deep/dir: "s/.." is /deep, not /x, as the guest kernel resolves it
    stat = guest({"/x/s": "/deep/dir"})
    assert await resolve_in_guest("/x/l", "s/../f", stat) == "/deep/f"
    # relative inner target, then a plain directory: cancelled lexically
    stat = guest({"/x/s": "a/b"})
    assert await resolve_in_guest("/x/l", "s/../../f", stat) == "/x/f"
    # missing: nothing to follow
    assert await resolve_in_guest("/l", "gone/../f", guest({})) == "/f"


async def test_resolve_in_guest_stops_in_a_loop_and_stays_inside():
    stat = guest({"/a": "b", "/b": "a"})
    out = await resolve_in_guest("/l", "a/../../../etc", stat)
    assert out == normalize(out) and out.endswith("etc")
