"""Test certificates (trustme): one CA, a vCenter cert and a distinct ESXi cert.

Files written to ``directory``:

* ``ca.pem``            the CA that signed the vCenter certificate (and by default ESXi's)
* ``esx-ca.pem``        with ``separate_esx_ca``: the second CA that signed ESXi's cert;
                        otherwise a copy of ``ca.pem``
* ``vcenter.pem`` / ``vcenter.key``, ``esx.pem`` / ``esx.key``  server chains and keys
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import trustme

DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class TlsFiles:
    ca_file: str
    esx_ca_file: str
    vcenter_cert: str
    vcenter_key: str
    esx_cert: str
    esx_key: str


def _write(path: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_certs(
    directory: str, hostnames: Sequence[str] = (), separate_esx_ca: bool = False
) -> TlsFiles:
    sans = list(dict.fromkeys([*DEFAULT_SANS, *hostnames]))
    ca = trustme.CA(organization_name="guestfs-sim test CA")
    esx_ca = trustme.CA(organization_name="guestfs-sim ESXi test CA") if separate_esx_ca else ca
    vc = ca.issue_cert(*sans, common_name="guestfs-sim vcenter")
    esx = esx_ca.issue_cert(*sans, common_name="guestfs-sim esxi")
    files = TlsFiles(
        ca_file=os.path.join(directory, "ca.pem"),
        esx_ca_file=os.path.join(directory, "esx-ca.pem"),
        vcenter_cert=os.path.join(directory, "vcenter.pem"),
        vcenter_key=os.path.join(directory, "vcenter.key"),
        esx_cert=os.path.join(directory, "esx.pem"),
        esx_key=os.path.join(directory, "esx.key"),
    )
    _write(files.ca_file, ca.cert_pem.bytes())
    _write(files.esx_ca_file, esx_ca.cert_pem.bytes())
    _write(files.vcenter_cert, b"".join(b.bytes() for b in vc.cert_chain_pems))
    _write(files.vcenter_key, vc.private_key_pem.bytes(), 0o600)
    _write(files.esx_cert, b"".join(b.bytes() for b in esx.cert_chain_pems))
    _write(files.esx_key, esx.private_key_pem.bytes(), 0o600)
    return files
