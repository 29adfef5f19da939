"""Where a worker-plane message came from, and whether an address is on that host: a hello
never makes the controller dial a third party."""

from __future__ import annotations

import ipaddress

import pynng


def source_host(message: pynng.Message) -> str:
    """The host a pub/sub message came from ("" if its connection is gone already)."""
    try:
        return str(message.pipe.remote_address).rsplit(":", 1)[0].strip("[]")
    except (pynng.NNGException, AttributeError, ValueError):
        return ""


def host_of(rpc_address: str) -> str:
    """The host of ``tcp://HOST:PORT`` or ``tls+tcp://[V6]:PORT`` (brackets dropped)."""
    return rpc_address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")


def same_host(rpc_address: str, source: str) -> bool:
    """Whether ``rpc_address`` (``tcp://HOST:PORT`` or ``tls+tcp://...``) is on the host a hello came from: a hello
    never makes the controller dial a third party. Loopback addresses are one host."""
    host = host_of(rpc_address)
    try:
        a, b = ipaddress.ip_address(host), ipaddress.ip_address(source)
    except ValueError:
        return False  # a name, or no source: an address we cannot tie to the hello's sender
    a = a.ipv4_mapped or a if isinstance(a, ipaddress.IPv6Address) else a
    b = b.ipv4_mapped or b if isinstance(b, ipaddress.IPv6Address) else b
    return a == b or (a.is_loopback and b.is_loopback)
