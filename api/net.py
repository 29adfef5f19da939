"""Network addresses, as pure functions: who is calling (the socket's peer, or, behind a reverse
proxy we trust (``--trusted-proxy``), the client address it forwarded in ``X-Forwarded-For``),
whether an address is this machine's loopback, and the group an address counts in for limits
(an IPv6 client owns a whole /64, so it counts as one).

The request-facing wrapper is ``api.params.client_address``.
"""

from __future__ import annotations

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: A forwarded "address" that is not one is used as it is, cut to this length (it is a dict key).
MAX_ADDRESS = 64


def parse_cidrs(text: str) -> tuple[Network, ...]:
    """``"10.0.0.0/8, 127.0.0.1"`` -> networks (a bare address is a /32 or /128).

    Raises ValueError naming the entry that is not a network."""
    nets = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError as e:
            raise ValueError(f"not an address or CIDR network: {item[:MAX_ADDRESS]!r}") from e
    return tuple(nets)


def client_address(peer: str, forwarded_for: list[str], trusted: tuple[Network, ...]) -> str:
    """The right-most address, of the peer then the ``X-Forwarded-For`` hops from right to left,
    that is not a trusted proxy. Each proxy appends the address it saw, so everything left of
    the first untrusted one may be made up by the client: it is never used. Without trusted
    proxies, the peer, whatever the headers say."""
    address = canonical(peer)
    if not trusted:
        return address
    hops = [h.strip() for header in forwarded_for for h in header.split(",") if h.strip()]
    while hops and _is_trusted(address, trusted):
        address = canonical(hops.pop())
    return address


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(canonical(host)).is_loopback
    except ValueError:
        return False


def address_group(address: str) -> str:
    """The key an address is limited under: an IPv4 address itself, an IPv6 address its /64
    (one subscriber gets a whole /64 and can pick any address in it)."""
    address = canonical(address)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return address


def canonical(address: str) -> str:
    """One spelling per address (``::ffff:10.0.0.1`` is ``10.0.0.1``), so keys cannot be varied."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:MAX_ADDRESS]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _is_trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)
