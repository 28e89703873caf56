"""[[guest_credentials]] rules: parsing, secrets kept out, first match wins."""

from __future__ import annotations

import textwrap

import pytest

from guestfs_mount.config import parse_config
from guestfs_mount.credentials import fleet_credentials
from guestfs_mount.errors import ConfigError


def _cfg(text, tmp_path):
    return parse_config(textwrap.dedent(text), str(tmp_path / "config.toml"))


def _secret(tmp_path, name, value):
    p = tmp_path / name
    p.write_text(value + "\n")
    p.chmod(0o600)
    return p


def test_rules_in_order_first_match_wins(tmp_path):
    _secret(tmp_path, "win.pw", "w1n")
    _secret(tmp_path, "web.pw", "w3b")
    _secret(tmp_path, "any.pw", "4ny")
    cfg = _cfg(
        """
        [[guest_credentials]]
        family = "Windows"
        guest_user = 'CORP\\forensic'
        guest_password_file = "win.pw"

        [[guest_credentials]]
        vms = ["web-*"]
        folder = "prod/web"
        guest_user = "root"
        guest_password_file = "web.pw"

        [[guest_credentials]]
        vms = "*"
        guest_user = "ops"
        guest_password_file = "any.pw"
        """,
        tmp_path,
    )
    rules = fleet_credentials(cfg.guest_credentials)
    assert [r.rule.family for r in rules] == ["windows", None, None]
    assert rules[1].rule.guest_password_file == str(tmp_path / "web.pw")

    def pick(name, family, folders=()):
        hit = next(r for r in rules if r.matches(name, family, lambda f: f in folders))
        return hit.creds.user_name, hit.creds.password

    assert pick("web-01", "windows") == ("CORP\\forensic", "w1n")
    assert pick("web-01", "linux", {"prod/web"}) == ("root", "w3b")
    assert pick("web-01", "linux") == ("ops", "4ny")  # not in the folder
    assert pick("web-01", None, {"prod/web"}) == ("root", "w3b")
    assert pick("db-01", None) == ("ops", "4ny")  # unknown family: no family rule matches
    assert "w1n" not in repr(rules)


def test_command_line_account_is_the_last_rule(tmp_path):
    pw = _secret(tmp_path, "root.pw", "r00t")
    rules = fleet_credentials((), "root", str(pw))
    assert len(rules) == 1 and rules[0].matches("anything", None, lambda f: False)
    assert fleet_credentials(()) == []  # no environment, no prompt for a whole fleet


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ('guest_user = "root"\npassword = "hunter2"', "secrets do not belong"),
        ('guest_user = "root"', "needs one of guest_password_file or saml_token_file"),
        ('guest_password_file = "x"', "guest_user"),
        ('guest_user = "r"\nguest_password_file = "x"\nfamily = "beos"', "must be one of"),
        ('guest_user = "r"\nguest_password_file = "x"\nvms = [1]', "globs"),
        ('guest_user = "r"\nguest_password_file = "x"\nname = "web"', "unknown key"),
    ],
)
def test_bad_rules_are_refused_without_echoing_secrets(tmp_path, body, words):
    with pytest.raises(ConfigError) as info:
        _cfg("[[guest_credentials]]\n" + body + "\n", tmp_path)
    assert words in str(info.value)
    assert "hunter2" not in str(info.value)
    assert "guest_credentials #1" in str(info.value)


def test_unreadable_password_file_is_a_start_up_error(tmp_path):
    cfg = _cfg(
        '[[guest_credentials]]\nguest_user = "root"\nguest_password_file = "missing.pw"\n',
        tmp_path,
    )
    with pytest.raises(ConfigError, match="missing.pw"):
        fleet_credentials(cfg.guest_credentials)


def _settings(*argv):
    from guestfs_mount.settings import build_config, resolve_args

    args, _ = resolve_args(list(argv))
    return build_config(args)


def test_all_vms_takes_server_and_mountpoint_and_the_rules(cli_env, tmp_path):
    _secret(tmp_path, "root.pw", "r00t")
    conf = tmp_path / "c.toml"
    conf.write_text('[[guest_credentials]]\nguest_user = "root"\nguest_password_file = "root.pw"\n')
    cfg = _settings("--all-vms", "--config", str(conf), "--vms", "web-*", "--vms", "db-*",
                    "--folder", "prod", "--vm-filter", "all", "--max-guest-ops", "16",
                    "--inventory-ttl", "5", "vc", cli_env)  # fmt: skip
    fleet = cfg.fleet
    assert fleet is not None and cfg.mountpoint == cli_env
    assert (fleet.vm_globs, fleet.folder, fleet.powered_on) == (("web-*", "db-*"), "prod", False)
    assert fleet.inventory_ttl == 5.0 and cfg.client.max_guest_ops == 16
    assert [c.creds.password for c in fleet.credentials] == ["r00t"]
    # The environment's guest password is never sent to every VM of a vCenter.
    assert cfg.client.guest.password is None


def test_all_vms_without_rules_or_with_a_vm_is_refused(cli_env):
    with pytest.raises(ConfigError, match="guest_credentials"):
        _settings("--all-vms", "vc", cli_env)
    with pytest.raises(SystemExit):
        _settings("--all-vms", "vc", "web01", cli_env)


def test_single_vm_mounts_have_no_fleet_and_no_global_cap(cli_env):
    cfg = _settings("vc", "web01", cli_env)
    assert cfg.fleet is None and cfg.client.max_guest_ops is None
    assert cfg.client.guest.password == "guest-secret"
