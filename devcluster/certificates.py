"""The cluster's PKI: a CA, the certificates of its servers and clients, and kubeconfigs."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
from pathlib import Path

from devcluster.paths import CERTS_DIR

# name, subject, extensions of each certificate the CA signs.
CERTIFICATES = [
    (
        "apiserver",
        "/CN=kube-apiserver",
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n"
        "extendedKeyUsage=serverAuth",
    ),
    ("admin", "/O=system:masters/CN=lorasweep-admin", "extendedKeyUsage=clientAuth"),
    # The operator's own identity, so the audit log can count its requests apart.
    ("operator", "/O=system:masters/CN=lorasweep-operator", "extendedKeyUsage=clientAuth"),
    # Kueue's webhook server; the apiserver calls it at 127.0.0.1 and trusts the CA.
    ("kueue", "/CN=kueue-webhook", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=CERTS_DIR)


def make_certs() -> None:
    """A CA, the apiserver's serving cert, an admin client cert and the service-account key."""
    CERTS_DIR.mkdir(parents=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "3650",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=lorasweep-dev-ca",
    )
    for name, subject, ext in CERTIFICATES:
        (CERTS_DIR / f"{name}.ext").write_text(ext + "\n")
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            subject,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-out",
            f"{name}.crt",
            "-extfile",
            f"{name}.ext",
        )
    _openssl("genrsa", "-out", "sa.key", "2048")
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")


def client_ssl_context() -> ssl.SSLContext:
    """The admin's TLS client context: trusts the CA, presents the admin certificate."""
    context = ssl.create_default_context(cafile=str(CERTS_DIR / "ca.crt"))
    context.load_cert_chain(str(CERTS_DIR / "admin.crt"), str(CERTS_DIR / "admin.key"))
    return context


def write_kubeconfig(api_url: str, path: Path, user: str) -> None:
    """A kubeconfig for `api_url` as `user`, one of the client certificates above."""

    def b64(name: str) -> str:
        return base64.b64encode((CERTS_DIR / name).read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "lorasweep-dev",
                "cluster": {"server": api_url, "certificate-authority-data": b64("ca.crt")},
            }
        ],
        "users": [
            {
                "name": f"lorasweep-{user}",
                "user": {
                    "client-certificate-data": b64(f"{user}.crt"),
                    "client-key-data": b64(f"{user}.key"),
                },
            }
        ],
        "contexts": [
            {
                "name": "lorasweep-dev",
                "context": {
                    "cluster": "lorasweep-dev",
                    "user": f"lorasweep-{user}",
                    "namespace": "default",
                },
            }
        ],
        "current-context": "lorasweep-dev",
    }
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)
