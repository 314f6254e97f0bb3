"""The gateway's TLS certificates while it runs: the CA's revocation list it installs, enforces and sends on to every
unit (revocation.py). Reloading renewed certificate files is common/tlsreload.py, shared with the connector."""

from gateway.certificates.revocation import install_crl, publish_crl, revocation_source, units_to_tell

__all__ = ["install_crl", "publish_crl", "revocation_source", "units_to_tell"]
