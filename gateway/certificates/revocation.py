"""The CA's certificate revocation list at the gateway.

The operator installs a list with ``hedui-gateway tls install-crl FILE``: it is checked (signed by the CA of the
gateway's certificates, numbered, not older than the list in place) and written atomically over ``[tls] crl_file``,
where the running gateway picks it up within ``check_interval_seconds``. The gateway enforces it on the agency API's
callers and on the units' server certificates, and sends it to every unit that exchanges online as a
REVOCATION_LIST trust item over SyncTrust (docs/exchange.md, "Trust synchronisation"); each unit checks the CA's
signature itself and acknowledges the item.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from hedui.v1 import trust_pb2
from sqlalchemy import Engine

from common.config import ConfigError
from common.tlsreload import RevocationSource
from gateway.config import GatewayConfig
from gateway.trust.items import TrustItems
from keys.crl import CrlError, RevocationList
from keys.tls import read_ca_bundle

log = logging.getLogger("hedui.gateway.certificates")

#: SYNC's outgoing trust items (gateway/trust/items.py), imported by name: the list is queued there for delivery.


def publish_crl(engine: Engine, der: bytes, now_ms: int, peers: Sequence[str]) -> bool:
    """Queue the list for ``peers`` as a REVOCATION_LIST trust item, delivered by the next SyncTrust with each and
    re-sent until acknowledged. True when the item is new, False when queued already."""
    items = TrustItems(engine)
    with engine.begin() as conn:
        new = items.publish(
            conn, kind=trust_pb2.TRUST_ITEM_KIND_REVOCATION_LIST, payload=der, now_ms=now_ms, peers=list(peers)
        )
    return bool(new)


def _ca_bundle(config: GatewayConfig) -> bytes:
    """The CA certificates a list may be signed by: those of the API's server certificate and of the client
    certificate towards the units (one private CA normally signs both)."""
    paths: list[Path] = [p for p in (config.server.tls_ca, config.client_tls.ca) if p is not None]
    if not paths:
        raise ConfigError("a revocation list needs a CA: set server.tls_ca or client_tls.ca")
    return b"".join(read_ca_bundle(path) for path in dict.fromkeys(paths))


def revocation_source(config: GatewayConfig, ca_pem: Callable[[], bytes] | None = None) -> RevocationSource | None:
    """The list the gateway enforces (None without ``[tls] crl_file``); ``ca_pem`` gives the current CA bundle
    (default: read from the configured CA files). Raises CrlError when the file holds a list the CA did not sign."""
    path = config.tls.crl_file
    if path is None:
        return None
    return RevocationSource(path, ca_pem or (lambda: _ca_bundle(config)), interval=config.tls.check_interval_seconds)


def install_crl(config: GatewayConfig, data: bytes) -> tuple[RevocationList, bool]:
    """Check ``data`` and write it over ``[tls] crl_file``; (the list now in force, whether it is new: False when
    it was in place already).
    Raises CrlError naming what is wrong (not the CA's, older than the list in place ...), having changed nothing."""
    if config.tls.crl_file is None:
        raise ConfigError("[tls] crl_file is not set: name the file the gateway reads the revocation list from")
    try:
        source = revocation_source(config)
    except CrlError as exc:
        raise CrlError(f"the list in place ({config.tls.crl_file}) does not verify: {exc}", exc.code) from None
    assert source is not None
    new = source.put(data)
    if new is not None:
        return new, True
    held = source.holding(data)
    assert held is not None  # put() found the same list held
    return held, False
