"""The fleet's TLS files, made with the openssl CLI: a CA, a server certificate per listener host
and a client certificate per account (EC P-256). Existing files are kept; a new CA reissues all.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from broker.errors import BrokerError
from broker.layout import FleetLayout

CA_DAYS = 3650
CERT_DAYS = 825  # what browsers and Apple accept for a leaf; re-run after deleting to renew
CA_SUBJECT = "/CN=nmoe-edge fleet CA"
# A minimal openssl config: the system's openssl.cnf may add extensions or be missing.
OPENSSL_CONFIG = "[req]\ndistinguished_name = dn\n[dn]\n"
CA_EXTENSIONS = ["basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign",
                 "subjectKeyIdentifier=hash"]
LEAF_EXTENSIONS = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature",
                   "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid:always"]


def server_names(host: str) -> list[str]:
    """subjectAltName entries of the server certificate for a listener on `host`."""
    names = ["IP:127.0.0.1", "DNS:localhost"]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        names.append(f"DNS:{host}")
    else:  # a wildcard listener is reached by the machine's name
        names.append(f"DNS:{socket.gethostname()}" if ip.is_unspecified else f"IP:{ip}")
    return list(dict.fromkeys(names))


def ensure_tls(layout: FleetLayout, host: str, accounts: Iterable[str]) -> None:
    """Create whatever TLS file is missing: the CA, the server cert for `host`, each account's cert."""
    openssl = _Openssl()
    renew = not (layout.ca_cert.exists() and layout.ca_key.exists())
    if renew:
        openssl.issue(layout.ca_cert, layout.ca_key, CA_SUBJECT, CA_EXTENSIONS, None)
    ca = (layout.ca_cert, layout.ca_key)
    wanted = [(layout.server_cert(host), layout.server_key(host), f"/CN={host}",
               ["extendedKeyUsage=serverAuth", f"subjectAltName={','.join(server_names(host))}"])]
    wanted += [(layout.client_cert(a), layout.client_key(a), f"/CN={a}", ["extendedKeyUsage=clientAuth"])
               for a in accounts]
    for cert, key, subject, extensions in wanted:
        if renew or not (cert.exists() and key.exists()):
            openssl.issue(cert, key, subject, LEAF_EXTENSIONS + extensions, ca)


class _Openssl:
    """The openssl binary, run with a minimal config."""

    def __init__(self) -> None:
        binary = shutil.which("openssl")
        if binary is None:
            raise BrokerError("openssl is not installed (needed for --tls): apt-get install openssl")
        self.binary = binary

    def issue(self, cert: Path, key: Path, subject: str, extensions: list[str],
              ca: tuple[Path, Path] | None) -> None:
        """A new P-256 key and its certificate signed by `ca` (cert, key), or self-signed if None."""
        cert.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cert.parent) as tmp:
            work = Path(tmp)
            (work / "openssl.cnf").write_text(OPENSSL_CONFIG)
            (work / "ext.cnf").write_text("\n".join(extensions) + "\n")
            self._run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                      "-out", work / "key")
            self._run("req", "-new", "-config", work / "openssl.cnf", "-key", work / "key",
                      "-subj", subject, "-out", work / "csr")
            signer: list[str | Path] = ["-signkey", work / "key"] if ca is None else ["-CA", ca[0], "-CAkey", ca[1]]
            days = CA_DAYS if ca is None else CERT_DAYS
            self._run("x509", "-req", "-in", work / "csr", *signer, "-days", str(days),
                      "-set_serial", f"0x{secrets.token_hex(16)}", "-extfile", work / "ext.cnf",
                      "-out", work / "crt")
            os.chmod(work / "key", 0o600)
            os.replace(work / "key", key)
            os.replace(work / "crt", cert)

    def _run(self, *args: str | Path) -> None:
        result = subprocess.run([self.binary, *map(str, args)], check=False, capture_output=True, text=True,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            detail = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise BrokerError(f"openssl {args[0]} failed (status {result.returncode}): {detail}")
