"""From the command line to the MountConfig the mount runs, and the deadlines derived there."""

from __future__ import annotations

import pytest

from guestfs_mount.errors import ConfigError
from guestfs_mount.model import CredentialType
from guestfs_mount.mount import client_deadlines
from guestfs_mount.settings import build_config, resolve_args


def config(*argv):
    args, _ = resolve_args(list(argv))
    return build_config(args)


def test_command_line_to_mount_config(cli_env):
    cfg = config("--metadata-ttl", "7", "--frozen", "--cache-size", "1G", "vc", "web01", cli_env)
    assert (cfg.vm, cfg.mountpoint, cfg.metadata_ttl, cfg.frozen) == ("web01", cli_env, 7.0, True)
    assert cfg.cache_size == 1 << 30 and cfg.cache_dir is None  # the cache makes its own
    assert cfg.client.server == "vc" and not cfg.client.allow_http
    assert (cfg.client.user, cfg.client.password) == ("admin", "vc-secret")
    assert cfg.client.guest.type is CredentialType.USERNAME_PASSWORD
    assert cfg.client.guest.password == "guest-secret"


@pytest.mark.parametrize("server", ["http://vc", "HTTP://vc", "Http://vc:8080"])
def test_plain_http_as_written(cli_env, server):
    assert config(server, "web01", cli_env).client.allow_http


def test_no_user_is_a_config_error(cli_env, monkeypatch):
    monkeypatch.delenv("GUESTFS_USER")
    with pytest.raises(ConfigError, match="no vCenter user"):
        config("vc", "web01", cli_env)


@pytest.mark.parametrize("timeout", [1.0, 10.0, 60.0, 600.0])
def test_client_gives_up_inside_the_fuse_deadline(cli_env, timeout):
    """The client must fail with its own error before the request handler's deadline."""
    client = client_deadlines(config("vc", "web01", cli_env).client, timeout)
    assert client.call_timeout < timeout and client.retry_budget < timeout
    assert client.transfer_stall_timeout < timeout
    assert client.password == "vc-secret"  # the rest is kept


def test_bad_esx_host_port_is_a_usage_error() -> None:
    from guestfs_mount.errors import ConfigError
    from guestfs_mount.model import CredentialType, GuestCredentials
    from guestfs_mount.vcenter import ClientConfig

    guest = GuestCredentials(CredentialType.USERNAME_PASSWORD, "root", "pw")
    with pytest.raises(ConfigError, match="--esx-host 'esx1:99999' has an invalid port"):
        ClientConfig(server="vc", user="u", password="p", guest=guest, esx_hosts=("esx1:99999",))
    ClientConfig(server="vc", user="u", password="p", guest=guest, esx_hosts=("esx*:8443",))
