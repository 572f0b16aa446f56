"""What the gateway says as it starts: one line of what it serves, and warnings a new user needs."""

from __future__ import annotations

import logging

from wattgate.proxy.cli import version
from wattgate.proxy.keys import GatewayKeys
from wattgate.proxy.ledger_store import ledger_place
from wattgate.proxy.settings import Settings, gateway_id

log = logging.getLogger("wattgate")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def log_startup(settings: Settings, keys: GatewayKeys, host: str, port: int, workers: int = 1) -> None:
    """One line saying what the gateway serves and where its figures go (``keys``: the gateway keys read at
    start-up); a warning when it is open to others."""
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    ledger = f"{ledger_place(settings.ledger)} as {gateway_id(settings)}" if settings.ledger.enabled else "off"
    gpus = ",".join(map(str, settings.metered_gpus)) or "none"
    log.info("wattgate %s: models %s on %s/v1%s; meter %s (GPUs %s); ledger %s; keys %s%s",
             version(), ", ".join(settings.models), url, f" (chat page {url}/chat)" if settings.gateway.chat_page else "",
             settings.meter.source, gpus, ledger, f"on ({len(keys.teams)} teams)" if keys.on else "off",
             f"; {workers} workers" if workers > 1 else "")
    if not keys.on and host not in LOOPBACK:
        log.warning("gateway keys are off and the gateway listens on %s: anyone who reaches it can call the "
                    "models and read every record; set gateway.auth (docs/configuration.md)", host)
