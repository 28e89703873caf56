"""The config file: TOML -> validated servers and profiles, with errors naming the file,
section and key; and how the command line layers over it (no mount needed)."""

from __future__ import annotations

import os
import textwrap

import pytest

from guestfs_mount import cli, credentials, settings
from guestfs_mount.config import default_path, find_config, load_config, parse_config
from guestfs_mount.errors import ConfigError

TP = "AB:" * 31 + "AB"  # 32 bytes as a colon-separated fingerprint

GOOD = f"""
[servers.prod]
server = "vc.example.com"
user = "svc-guestfs@vsphere.local"
password_file = "~/.secrets/vc-prod"
ca_file = "/etc/ssl/vmca.pem"
esx_ca_file = "certs/esx.pem"
thumbprints = {{ "esx01.example.com" = "{TP}" }}
esx_hosts = ["esx*.example.com"]

[servers."vc2.example.com"]

[profiles.prod-web01]
server = "prod"
vm = "web01"
guest_user = "root"
guest_password_file = "~/.secrets/web01-root"
guest_root = "/"
options = {{ frozen = true, metadata_ttl = 120, audit_log = "/var/log/guestfs/web01.jsonl" }}
"""


def parse(text: str, path: str = "/etc/g/config.toml", mode: int | None = 0o100600):
    return parse_config(textwrap.dedent(text), path, mode=mode)


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value)


def test_good_config():
    cfg = parse(GOOD)
    prod = cfg.servers["prod"]
    assert prod.server == "vc.example.com"
    assert prod.user == "svc-guestfs@vsphere.local"
    assert prod.password_file == os.path.expanduser("~/.secrets/vc-prod")
    assert prod.esx_ca_file == "/etc/g/certs/esx.pem"  # relative to the config's folder
    assert prod.thumbprints == {"esx01.example.com": "ab" * 32}
    assert prod.esx_hosts == ("esx*.example.com",)
    assert cfg.servers["vc2.example.com"].server == "vc2.example.com"  # defaults to its name
    web = cfg.profile("prod-web01")
    assert web.server is prod
    assert (web.vm, web.guest_user, web.guest_root) == ("web01", "root", "/")
    assert web.options["metadata_ttl"] == 120
    assert cfg.warnings == ()


@pytest.mark.parametrize(
    "text, words",
    [
        ('[servers.a]\npassword = "hunter2"\n', ["[servers.a] password", "password_file"]),
        (
            '[servers.a]\n[profiles.p]\nserver = "a"\nvm = "v"\nguest_password = "hunter2"\n',
            ["[profiles.p] guest_password", "guest_password_file"],
        ),
        (
            '[servers.a]\n[profiles.p]\nserver = "a"\nvm = "v"\noptions = { password = "hunter2" }\n',
            ["[profiles.p.options] password"],
        ),
    ],
)
def test_password_keys_are_refused_without_echoing_them(text, words):
    msg = error_of(text)
    assert "hunter2" not in msg
    assert "/etc/g/config.toml" in msg
    for w in words:
        assert w in msg


@pytest.mark.parametrize(
    "text, words",
    [
        ('[servers.a]\nusr = "x"\n', ["[servers.a] usr", "unknown key"]),
        (
            '[servers.a]\n[profiles.p]\nserver = "a"\nvm = "v"\nfrozen = true\n',
            ["[profiles.p] frozen", "unknown"],
        ),
        ("[server.a]\n", ["unknown key 'server'"]),
        ('[profiles.p]\nserver = "nope"\nvm = "v"\n', ["[profiles.p] server", "no [servers.nope]"]),
        ('[servers.a]\n[profiles.p]\nserver = "a"\n', ["[profiles.p] vm", "missing"]),
        ('[servers.a]\n[profiles.p]\nvm = "v"\n', ["[profiles.p] server", "missing"]),
        ('[servers.a]\nthumbprints = { "h" = "AB:CD" }\n', ["[servers.a] thumbprints", "64 hex"]),
        ("[servers.a]\nesx_hosts = [1]\n", ["[servers.a] esx_hosts"]),
        ("[servers.a]\nuser = 5\n", ["[servers.a] user", "string"]),
        ('[servers.a]\napi = "new"\n', ["[servers.a] api", "auto, rest, preview, vi-json, soap"]),
        ('[servers.a]\nserver = "ftp://x"\n', ["[servers.a] server"]),
        (
            '[servers.a]\n[profiles.status]\nserver = "a"\nvm = "v"\n',
            ["[profiles.status]", "command"],
        ),
        ("[servers.a\n", ["not valid TOML", "line 1"]),
        (
            '[servers.a]\n[profiles.p]\nserver = "a"\nvm = "v"\nguest_password_file = "x"\nsaml_token_file = "y"\n',
            ["exclusive"],
        ),
    ],
)
def test_errors_name_file_section_and_key(text, words):
    msg = error_of(text)
    assert msg.startswith("/etc/g/config.toml:"), msg
    for w in words:
        assert w in msg, msg


def test_world_readable_config_only_warns():
    cfg = parse(GOOD, mode=0o100644)
    assert len(cfg.warnings) == 1
    assert "readable by other users" in cfg.warnings[0]


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"no profile 'web02' \(defined: prod-web01\)"):
        parse(GOOD).profile("web02")


def test_load_config_missing_and_mode(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.toml"))
    f = tmp_path / "c.toml"
    f.write_text(GOOD)
    f.chmod(0o644)
    assert load_config(str(f)).warnings
    f.chmod(0o600)
    assert not load_config(str(f)).warnings


def test_default_path_follows_xdg(tmp_path, monkeypatch):
    assert default_path({"XDG_CONFIG_HOME": "/x", "HOME": "/h"}) == ("/x/guestfs-mount/config.toml")
    assert default_path({"HOME": "/h"}) == "/h/.config/guestfs-mount/config.toml"
    assert default_path({"XDG_CONFIG_HOME": "rel", "HOME": "/h"}) == (
        "/h/.config/guestfs-mount/config.toml"
    )
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "guestfs-mount").mkdir()
    (tmp_path / "guestfs-mount" / "config.toml").write_text("")
    assert find_config() == str(tmp_path / "guestfs-mount" / "config.toml")


# -- the command line over the config ---------------------------------------------------


@pytest.fixture
def conf(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    path = tmp_path / "config.toml"
    path.write_text(GOOD)
    path.chmod(0o600)
    return str(path)


def resolve(*argv):
    ns, _ = settings.resolve_args(list(argv))
    return ns


def test_profile_layers(conf):
    ns = resolve("--config", conf, "--profile", "prod-web01", "/mnt/w")
    assert ns.server == "vc.example.com" and ns.vm == "web01" and ns.mountpoint == "/mnt/w"
    assert ns.user == "svc-guestfs@vsphere.local"
    assert ns.frozen is True and ns.metadata_ttl == 120.0
    assert ns.audit_log == "/var/log/guestfs/web01.jsonl"
    assert ns.thumbprint == [("esx01.example.com", "ab" * 32)]
    assert ns.timeout == 60.0  # built-in default


def test_command_line_overrides_profile(conf, tmp_path):
    ns = resolve(
        "--config", conf, "--profile", "prod-web01", "/mnt/w",
        "--metadata-ttl", "5", "--user", "other", "--guest-root", "/var",
        "--thumbprint", f"vc.example.com={TP}", "--saml-token-file", "tok",
    )  # fmt: skip
    assert ns.metadata_ttl == 5.0 and ns.user == "other" and ns.guest_root == "/var"
    assert len(ns.thumbprint) == 2  # thumbprints add up
    assert ns.saml_token_file == os.path.abspath("tok")
    assert ns.guest_password_file is None  # the CLI's guest secret replaces the profile's


def test_fstab_form(conf):
    ns = resolve(
        "prod-web01", "/mnt/w", "-o",
        "_netdev,allow_other,metadata_ttl=7,cache_size=2G,ro,noauto,user,nofail,defaults,"
        "nodev,nosuid,dev,suid,noatime,x-systemd.automount,x-systemd.idle-timeout=60,"
        f"frozen=no,config={conf}",
    )  # fmt: skip
    assert ns.profile == "prod-web01" and ns.mountpoint == "/mnt/w"
    assert ns.allow_other is True
    assert ns.metadata_ttl == 7.0
    assert ns.cache_size == 2 << 30
    assert ns.frozen is False  # -o overrides the profile's options


def test_three_positionals_may_name_a_server(conf):
    ns = resolve("--config", conf, "prod", "db01", "/mnt/d")
    assert ns.server == "vc.example.com" and ns.user == "svc-guestfs@vsphere.local"
    ns = resolve("--config", conf, "vc9.example.com:8443", "db01", "/mnt/d")
    assert ns.server == "vc9.example.com:8443" and ns.user is None


def test_options_may_come_first(conf):
    ns = resolve("--ca-file", "ca.pem", "vc", "--frozen", "vm", "/mnt/x")
    assert (ns.server, ns.vm, ns.mountpoint) == ("vc", "vm", "/mnt/x")
    assert ns.ca_file == os.path.abspath("ca.pem") and ns.frozen


@pytest.mark.parametrize(
    "opts, words",
    [
        ("rw", ["read-only"]),
        ("bogus", ["mount option 'bogus'", "unknown"]),
        ("password=hunter2", ["mount option 'password'", "secret"]),
        ("metadata_ttl=soon", ["metadata_ttl", "soon"]),
        ("metadata_ttl", ["needs a value"]),
        ("cache_size=lots", ["not a size"]),
        ("frozen=maybe", ["switch"]),
        ("api=new", ["must be one of"]),
        ("profile=x", ["unknown"]),
    ],
)
def test_bad_mount_options(conf, opts, words):
    with pytest.raises(ConfigError) as info:
        resolve("--config", conf, "prod-web01", "/mnt/w", "-o", opts)
    msg = str(info.value)
    assert "hunter2" not in msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize(
    "options, words",
    [
        ("{ frozen = 1 }", ["options.frozen", "switch"]),
        ("{ metadata_ttl = 'x' }", ["options.metadata_ttl", "not a valid float"]),
        ("{ nosuch = 1 }", ["options.nosuch", "unknown option"]),
        ("{ config = 'x' }", ["options.config"]),
        ("{ esx_host = ['a', 2] }", []),
        ("{ uid = [1, 2] }", ["options.uid", "one value"]),
        ("{ cache_size = '2 parsecs' }", ["options.cache_size", "not a size"]),
    ],
)
def test_bad_profile_options(tmp_path, monkeypatch, options, words):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    path = tmp_path / "c.toml"
    path.write_text(f'[servers.a]\n[profiles.p]\nserver = "a"\nvm = "v"\noptions = {options}\n')
    if not words:  # numbers are accepted as strings where a string is expected
        assert resolve("--config", str(path), "--profile", "p", "/m").esx_host == ["a", "2"]
        return
    with pytest.raises(ConfigError) as info:
        resolve("--config", str(path), "--profile", "p", "/m")
    msg = str(info.value)
    assert msg.startswith(f"{path}: [profiles.p] "), msg
    for w in words:
        assert w in msg, msg


def test_profile_paths_are_relative_to_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    path = tmp_path / "c.toml"
    path.write_text(
        '[servers.a]\npassword_file = "pw"\n[profiles.p]\nserver = "a"\nvm = "v"\n'
        'options = { audit_log = "logs/a.jsonl", cache_dir = "~/cache" }\n'
    )
    ns = resolve("--config", str(path), "--profile", "p", "/m")
    assert ns.password_file == str(tmp_path / "pw")
    assert ns.audit_log == str(tmp_path / "logs/a.jsonl")
    assert ns.cache_dir == os.path.expanduser("~/cache")


def test_profile_without_a_config_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    if os.path.exists("/etc/guestfs-mount/config.toml"):
        pytest.skip("a system-wide config exists")
    assert cli.main(["--profile", "web", "/mnt/w"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("guestfs-mount: error: profile 'web': no config file")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv",
    [["a", "/m"], ["--profile", "p", "a", "/m"], ["a", "b", "c", "d"], []],
)
def test_usage_errors(tmp_path, monkeypatch, argv, capsys):
    path = tmp_path / "c.toml"
    path.write_text('[servers.a]\n[profiles.a]\nserver = "a"\nvm = "v"\n')
    if argv == ["a", "/m"]:  # the fstab form with a profile that exists gets further
        assert settings.resolve_args(["--config", str(path), *argv])[0].vm == "v"
        return
    with pytest.raises(SystemExit) as info:
        settings.resolve_args(["--config", str(path), *argv])
    assert info.value.code == 2
    assert "usage: guestfs-mount" in capsys.readouterr().err


def test_version_and_help(capsys):
    from guestfs_mount import __version__

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"guestfs-mount {__version__}"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for heading in (
        "config file and profiles:",
        "vCenter and guest accounts:",
        "TLS and trust:",
        "what the mount shows:",
        "cache and performance:",
        "running:",
        "examples:",
    ):
        assert heading in out
    # every option has a one-line description
    assert "--metadata-ttl SECONDS" in out and "--profile NAME" in out


def test_password_file_warns_when_world_readable(tmp_path, caplog):
    f = tmp_path / "pw"
    f.write_text("s3cret-value\n")
    f.chmod(0o644)
    assert credentials.read_secret_file(str(f), "password") == "s3cret-value"
    assert "readable by other users" in caplog.text
    assert "s3cret-value" not in caplog.text
