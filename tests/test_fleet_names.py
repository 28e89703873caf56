"""VM directory names: guest-controlled text made safe, unique and stable."""

from __future__ import annotations

import os

import pytest

from guestfs_mount.fleet.names import BY_ID, is_safe_id, vm_dir_names
from guestfs_mount.paths import is_safe_name


def test_plain_unique_names_are_kept():
    assert vm_dir_names([("vm-1", "web-01"), ("vm-2", "ünïcode-日本"), ("vm-3", "-rf")]) == {
        "vm-1": "web-01", "vm-2": "ünïcode-日本", "vm-3": "-rf",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("a/b", "a_b~vm-7"),
        (".", "_~vm-7"),
        ("..", "__~vm-7"),
        ("", "_~vm-7"),
        ("nul\0name", "nul_name~vm-7"),
        ("esc\x1b[31mred", "esc_[31mred~vm-7"),
        ("tab\there", "tab_here~vm-7"),
        ("c1\x9bcontrol", "c1\x9bcontrol~vm-7"),
        (BY_ID, BY_ID + "~vm-7"),
    ],
)
def test_unsafe_names_get_the_id_form(name, shown):
    got = vm_dir_names([("vm-7", name)])["vm-7"]
    assert got == shown
    assert is_safe_name(got)


def test_long_names_are_cut_on_a_character_boundary():
    got = vm_dir_names([("vm-9", "日" * 200)])["vm-9"]
    assert got.endswith("~vm-9")
    assert len(os.fsencode(got)) <= 255
    assert set(got[: -len("~vm-9")]) == {"日"}


def test_duplicates_and_lookalikes_stay_unique():
    pairs = [("vm-1", "dup"), ("vm-2", "dup"), ("vm-3", "dup~vm-1"), ("vm-4", "dup~vm-99")]
    names = vm_dir_names(pairs)
    assert names["vm-1"] == "dup~vm-1" and names["vm-2"] == "dup~vm-2"
    # A real name that looks like a generated one never takes that one's place.
    assert names["vm-3"] == "dup~vm-1~vm-3"
    assert names["vm-4"] == "dup~vm-99"  # no VM vm-99: nothing to collide with
    assert len(set(names.values())) == len(pairs)


def test_same_inventory_same_names():
    pairs = [("vm-1", "a/b"), ("vm-2", "x"), ("vm-3", "x")]
    assert vm_dir_names(pairs) == vm_dir_names(list(reversed(pairs)))


@pytest.mark.parametrize(("vm", "ok"), [("vm-42", True), ("vm~1", False), ("", False),
                                        ("../x", False), ("vm-1\0", False)])  # fmt: skip
def test_vm_ids_must_be_plain(vm, ok):
    assert is_safe_id(vm) is ok
