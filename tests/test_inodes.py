from guestfs_mount.inodes import ROOT_INODE, InodeTable


def test_stable_numbers_and_lookup_counts():
    t = InodeTable()
    assert t.inode("/") == ROOT_INODE
    a = t.inode("/a")
    assert t.inode("/b") != a
    assert t.inode("/a") == a
    assert t.path(a) == "/a"
    t.add_lookup(a, 2)
    assert not t.forget(a, 1)
    assert t.forget(a, 1)
    assert t.inode("/a") == a  # numbers survive forget
    assert t.path(999) is None
