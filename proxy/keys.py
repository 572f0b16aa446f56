"""Who a caller is: the gateway's keys (``gateway.auth``), ``alias:key`` entries from a variable or a file,
each alias a team, and the aliases that may see every team's metrics."""

from __future__ import annotations

import os
from collections.abc import Iterable

from wattgate.proxy.errors import Unauthorized
from wattgate.proxy.settings import Auth, ConfigError


class GatewayKeys:
    """The keys a gateway accepts (``{key: alias}``; none: auth is off) and its metrics aliases."""

    def __init__(self, keys: dict[str, str], metrics_aliases: Iterable[str] = ()) -> None:
        self._keys = keys
        self.metrics_aliases = frozenset(metrics_aliases)

    @classmethod
    def from_settings(cls, auth: Auth | None) -> GatewayKeys:
        """Read once, at start-up (a file may be given); refused as :func:`load_keys` says."""
        return cls(load_keys(auth), auth.metrics_aliases if auth else ())

    @property
    def on(self) -> bool:
        return bool(self._keys)

    @property
    def teams(self) -> list[str]:
        """The teams the keys name (the metrics aliases are not teams)."""
        return sorted(set(self._keys.values()) - self.metrics_aliases)

    def team(self, authorization: str) -> str | None:
        """The team of the caller whose ``Authorization`` header this is; None when auth is off.
        Raises :class:`Unauthorized` for a missing or unknown key."""
        if not self._keys:
            return None
        scheme, _, key = authorization.partition(" ")
        alias = self._keys.get(key.strip()) if scheme.lower() == "bearer" else None
        if alias is None:
            raise Unauthorized("missing or unknown gateway API key")
        return alias

    def sees_every_team(self, team: str | None) -> bool:
        """Whether a caller of ``team`` sees every team's figures (auth off, or a metrics alias)."""
        return team is None or team in self.metrics_aliases


def load_keys(auth: Auth | None) -> dict[str, str]:
    """Gateway keys as ``{key: alias}``; empty only when ``gateway.auth`` is left out (auth off).

    Auth fails closed: a configured source that yields no key (an unset or empty variable, an empty
    file) or a key given to two aliases is refused, naming the variable or file, never the key.
    """
    if auth is None:
        return {}
    sources: list[tuple[str, str]] = []  # (what it is called in messages, its text)
    if auth.keys_env:
        sources.append((f"${auth.keys_env}", os.environ.get(auth.keys_env, "")))
    if auth.keys_file:
        try:
            sources.append((f"file {auth.keys_file}", auth.keys_file.read_text(encoding="utf-8")))
        except OSError as exc:
            raise ConfigError(f"cannot read gateway keys file {auth.keys_file}: {exc.strerror}") from None
    keys: dict[str, str] = {}
    for where, raw in sources:
        for item in raw.replace(",", "\n").splitlines():
            item = item.strip()
            if not item or item.startswith("#"):
                continue
            alias, sep, key = (part.strip() for part in item.partition(":"))
            if not sep or not alias or not key:
                raise ConfigError(f"gateway keys in {where} must be 'alias:key' entries (the key itself is not shown)")
            if keys.get(key, alias) != alias:
                raise ConfigError(f"gateway keys in {where}: one key is given to two aliases, "
                                  f"'{keys[key]}' and '{alias}' (each key must name one team)")
            keys[key] = alias
    if not keys:
        named = " and ".join(where for where, _ in sources)
        raise ConfigError(f"gateway.auth is on but {named} holds no key (unset or empty): set 'alias:key' "
                          "entries there, or remove gateway.auth to run without keys")
    if unknown := set(auth.metrics_aliases) - set(keys.values()):
        raise ConfigError(f"gateway.auth.metrics_aliases: no key in {' or '.join(w for w, _ in sources)} "
                          f"has the alias {', '.join(sorted(unknown))}")
    return keys
