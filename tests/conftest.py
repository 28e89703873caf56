import faulthandler
import os
import shutil

import pytest

from guestfs_mount.sim.testing import run_simulator
from guestfs_mount.testing import TRANSPORTS
from tests import trees

faulthandler.enable()


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


# A fresh guest tree (trees.build) and a simulator over it, per test: for modules whose
# tests change the guest or the simulator's state. A module that wants another tree or
# a wider scope defines its own ``source`` and ``sim``, which take precedence.
@pytest.fixture
def source(tmp_path):
    root = str(tmp_path / "guest")
    os.mkdir(root)
    trees.build(root)
    return root


@pytest.fixture
def sim(source):
    with run_simulator("--root", source) as s:
        yield s


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    """For turning command lines into a MountConfig: the secrets in the environment, no
    user config file; the value is an empty mount point."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("GUESTFS_USER", "admin")
    monkeypatch.setenv("GUESTFS_PASSWORD", "vc-secret")
    monkeypatch.setenv("GUESTFS_GUEST_USER", "root")
    monkeypatch.setenv("GUESTFS_GUEST_PASSWORD", "guest-secret")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return str(mnt)


@pytest.fixture(scope="module", params=TRANSPORTS)
def api(request):
    """The transport an end-to-end module's mounts use (``--api``); with
    ``testing.ViaApi(sim, api)`` every mount of the module runs once per transport."""
    return request.param


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "one_transport: transport-independent (kernel or body path only): run over rest alone",
    )


def pytest_collection_modifyitems(config, items):
    # A test marked one_transport runs once, over rest: the others add only CI time.
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        api = callspec.params.get("api") if callspec is not None else None
        once = item.get_closest_marker("one_transport") is not None
        (drop if once and api not in (None, TRANSPORTS[0]) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    if fuse_available():
        return
    skip = pytest.mark.skip(reason="needs /dev/fuse and fusermount3")
    for item in items:
        if "fuse" in item.keywords:
            item.add_marker(skip)
