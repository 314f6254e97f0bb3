"""The gateway's TLS certificates while it runs: the CA's revocation list it installs, enforces and sends on to every
unit (revocation.py), and the units' certificate requests it keeps until the agency's CA signs them, sending each
certificate back (requests.py; the ``hedui-gateway tls`` commands in commands.py). Reloading renewed certificate files
is common/tlsreload.py, shared with the connector."""

from gateway.certificates.requests import CertificateRequests, NamePolicy, unit_policies
from gateway.certificates.revocation import install_crl, publish_crl, revocation_source

__all__ = [
    "CertificateRequests",
    "NamePolicy",
    "install_crl",
    "publish_crl",
    "revocation_source",
    "unit_policies",
]
