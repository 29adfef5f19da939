"""Login throttling across addresses: a failure budget per account that slows guesses from new
places (never refuses them), which addresses the account logged in from before are spared, so
that an attacker spraying from many addresses cannot lock its owner out; IPv6 addresses counted by their /64; limits
whose memory is bounded without a spray of keys wiping everyone's counts.

The pure throttle with a fake clock, then the in-process app over real TCP: real source
addresses (127.0.x.y, bound before connecting) and X-Forwarded-For through a trusted proxy."""

from __future__ import annotations

import asyncio
import dataclasses

import aiohttp
import pytest

from api.keys import AUTH, LOGIN_LIMITS
from api.net import parse_cidrs
from api.ratelimit import FailureLimiter, LoginThrottle
from common.models import TooManyRequests
from server.services import build_app
from tests.helpers import ADMIN_PASSWORD, basic

DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def attempt(t: LoginThrottle, user: str, address: str, ok: bool) -> None:
    """One login through the throttle that ends as ``ok`` says (raises TooManyRequests if refused)."""
    t.end(await t.begin(user, address), ok)


async def refused(t: LoginThrottle, user: str, address: str) -> float:
    """The Retry-After of an attempt the throttle refuses (fails the test if it admits it)."""
    with pytest.raises(TooManyRequests) as e:
        await attempt(t, user, address, ok=False)
    return e.value.retry_after


# -- the pure throttle ------------------------------------------------------------------------


def throttle(clock: Clock) -> LoginThrottle:
    """The server's defaults (20 account failures a day), with a short account delay."""
    return LoginThrottle(5, 60.0, clock=clock, account_delay=0.01)


async def test_the_account_budget_slows_new_places_and_refuses_no_one():
    clock = Clock()
    t = throttle(clock)
    await attempt(t, "admin", "10.9.9.9", ok=True)  # the owner's usual address
    for i in range(20):  # one failure from each of 20 addresses: each under its own limits
        await attempt(t, "admin", f"10.0.0.{i}", ok=False)
    assert t.slowed == 0
    await attempt(t, "admin", "10.0.1.1", ok=True)  # a new place, past the budget: slowed, not refused
    assert t.slowed == 1
    await attempt(t, "admin", "10.9.9.9", ok=True)  # the owner's place: no wait
    await attempt(t, "bob", "10.0.1.2", ok=True)  # another account: no wait
    assert t.slowed == 1
    for i in range(100):  # the spray goes on from new addresses: each guess waits, none is refused
        await attempt(t, "admin", f"10.0.2.{i}", ok=False)
    assert t.slowed == 101
    # What refuses: one address's failures for the user (and the address's for anyone)...
    for _ in range(5):
        await attempt(t, "admin", "10.0.3.1", ok=False)
    assert await refused(t, "admin", "10.0.3.1") == 60.0
    await attempt(t, "admin", "10.0.3.2", ok=True)  # ...never the owner's other places
    # A day without failures and the account's budget is whole again: no wait.
    clock.now += DAY + 1
    before = t.slowed
    await attempt(t, "admin", "10.0.5.1", ok=True)
    assert t.slowed == before


async def test_familiar_places_come_from_the_datastore_and_are_remembered_for_30_days():
    clock = Clock()
    t = throttle(clock)
    asked: list[str] = []

    async def familiar(place: str) -> bool:  # what the datastore remembers (across restarts)
        asked.append(place)
        return place == "10.9.9.9"

    async def spray(prefix: str) -> None:
        for i in range(20):
            await attempt(t, "admin", f"{prefix}.{i}", ok=False)

    await spray("10.0.0")
    t.end(await t.begin("admin", "10.9.9.9", familiar), ok=True)
    assert t.slowed == 0 and asked == ["10.9.9.9"]  # asked only while the account is past its budget
    await attempt(t, "admin", "10.9.9.9", ok=True)  # known in memory now
    assert asked == ["10.9.9.9"]
    clock.now += 31 * DAY
    await spray("10.0.1")
    await attempt(t, "admin", "10.9.9.9", ok=True)  # 31 days since: forgotten here, slowed
    assert t.slowed == 1


async def test_an_unlock_forgives_the_users_failures_on_the_next_attempt():
    t = throttle(Clock())
    for _ in range(5):
        await attempt(t, "admin", "10.0.0.1", ok=False)
    await refused(t, "admin", "10.0.0.1")
    stamp = [0.0]

    async def unlocked() -> float:
        return stamp[0]

    with pytest.raises(TooManyRequests):
        await t.begin("admin", "10.0.0.1", unlocked=unlocked)  # not unlocked yet
    stamp[0] = 5.0  # main.py users unlock admin
    t.end(await t.begin("admin", "10.0.0.1", unlocked=unlocked), ok=True)
    for _ in range(5):
        await attempt(t, "admin", "10.0.0.1", ok=False)
    with pytest.raises(TooManyRequests):  # the same unlock is applied once
        await t.begin("admin", "10.0.0.1", unlocked=unlocked)


async def test_concurrent_attempts_from_many_addresses_are_all_slowed_past_the_budget():
    """40 at once from 40 addresses: 20 are admitted at once (counted as failures from their
    start), the others after the account's delay; none refused. Right passwords from 30
    addresses at once all pass."""
    t = throttle(Clock())
    admitted = []

    async def wrong(address: str) -> None:
        a = await t.begin("admin", address)
        admitted.append(a)
        await asyncio.sleep(0)  # the slow hash
        t.end(a, ok=False)

    results = await asyncio.gather(*(wrong(f"10.0.0.{i}") for i in range(40)), return_exceptions=True)
    assert len(admitted) == 40 and not any(isinstance(r, Exception) for r in results)
    assert t.slowed == 20

    t = throttle(Clock())
    attempts = await asyncio.gather(*(t.begin("carol", f"10.0.0.{i}") for i in range(20)))
    waiting = [asyncio.ensure_future(t.begin("carol", f"10.0.1.{i}")) for i in range(10)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiting)  # would pass only if those under way succeed
    for a in attempts:
        t.end(a, ok=True)
    for a in await asyncio.gather(*waiting):
        t.end(a, ok=True)
    assert await t.begin("carol", "10.0.2.1")  # the successes left nothing counted


async def test_ipv6_addresses_of_one_64_are_one_address():
    t = LoginThrottle(5, 60.0, clock=Clock())
    for i in range(1, 6):
        await attempt(t, "admin", f"2001:db8:1:2::{i}", ok=False)
    await refused(t, "admin", "2001:db8:1:2:ffff:ffff:ffff:ffff")  # per user and address
    await attempt(t, "admin", "2001:db8:1:3::1", ok=False)  # the next /64: someone else
    for i in range(15):  # per address: 20 failures of any users
        await attempt(t, f"user{i}", f"2001:db8:1:2:{i:x}::1", ok=False)
    await refused(t, "dave", "2001:db8:1:2:abcd::1")
    # A success from any address of the /64 makes the whole /64 the owner's.
    t = LoginThrottle(5, 60.0, clock=Clock())
    await attempt(t, "admin", "2001:db8:9:9::1", ok=True)
    for i in range(20):
        await attempt(t, "admin", f"10.0.0.{i}", ok=False)
    await attempt(t, "admin", "2001:db8:9:9:5555::7", ok=True)


def test_a_spray_of_keys_does_not_reset_the_counts():
    clock = Clock()
    limiter = FailureLimiter(3, 60.0, clock)
    for _ in range(3):
        limiter.failed("victim")
    limiter.failed("recent")
    assert limiter.retry_after("victim") == 60.0
    for i in range(100_001):  # more keys than the limiter keeps
        limiter.failed(("spray", i))
        if i == 99_990:
            for _ in range(3):
                limiter.failed("late")
    assert limiter.retry_after("victim") == 60.0  # a blocked key outlives the spray
    assert limiter.retry_after("late") == 60.0
    assert len(limiter) <= 100_000  # memory stays bounded...
    assert "recent" not in limiter and ("spray", 0) not in limiter  # ...by the least recently failed
    assert ("spray", 100_000) in limiter
    clock.now += 61
    assert limiter.retry_after("victim") == 0.0


# -- the real app, over TCP ---------------------------------------------------------------------


async def login_from(client, source: str, user: str, password: str,
                     forwarded: str | None = None) -> tuple[int, str | None, dict]:
    """A login over a connection from ``source`` (a 127.x.y.z address): status, Retry-After, body."""
    headers = basic(user, password)
    if forwarded:
        headers["X-Forwarded-For"] = forwarded
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0))) as session:
        async with session.get(client.make_url("/login"), headers=headers) as r:
            assert r.content_type == "application/json"
            return r.status, r.headers.get("Retry-After"), await r.json()


async def test_wrong_passwords_from_40_addresses_lock_no_one_out(client):
    client.app[LOGIN_LIMITS].account_delay = 0.2  # (--login-slowdown: 2 s by default)
    owner = "127.0.0.2"
    assert (await login_from(client, owner, "admin", ADMIN_PASSWORD))[0] == 200

    results = await asyncio.gather(*(login_from(client, f"127.0.1.{i}", "admin", "wrong") for i in range(1, 41)))
    assert sorted(status for status, _, _ in results) == [401] * 40  # slowed past the budget, never 429
    assert client.app[LOGIN_LIMITS].slowed == 20

    # The spray goes on; meanwhile the owner, from where he logged in before, gets a token at once.
    *spray, mine = await asyncio.gather(*(login_from(client, f"127.0.2.{i}", "admin", "wrong") for i in range(1, 11)),
                                        login_from(client, owner, "admin", ADMIN_PASSWORD))
    assert [status for status, _, _ in spray] == [401] * 10
    assert mine[0] == 200 and mine[2]["user"] == "admin" and mine[2]["token"]
    assert client.app[LOGIN_LIMITS].slowed == 30
    # A new address gets in too, after the account's delay...
    status, _, body = await login_from(client, "127.0.3.1", "admin", ADMIN_PASSWORD)
    assert status == 200 and body["token"] and client.app[LOGIN_LIMITS].slowed == 31
    # ...and other accounts are not affected.
    await client.app[AUTH].add_user("bob", "bob-password")
    assert (await login_from(client, "127.0.3.2", "bob", "bob-password"))[0] == 200
    assert client.app[LOGIN_LIMITS].slowed == 31


async def test_right_passwords_from_many_new_addresses_at_once_all_pass(client):
    results = await asyncio.gather(*(login_from(client, f"127.0.4.{i}", "admin", ADMIN_PASSWORD)
                                     for i in range(1, 31)))
    assert [status for status, _, _ in results] == [200] * 30


async def test_ipv6_clients_of_one_64_behind_a_trusted_proxy_count_as_one(aiohttp_client, settings):
    trusted = dataclasses.replace(settings, trusted_proxies=parse_cidrs("127.0.0.1/32"))
    client = await aiohttp_client(build_app(trusted))

    async def wrong(address: str) -> int:
        return (await login_from(client, "127.0.0.1", "admin", "wrong", forwarded=address))[0]

    assert [await wrong(f"2001:db8:a:b::{i}") for i in range(1, 7)] == [401] * 5 + [429]
    assert await wrong("2001:db8:a:b:ffff:ffff:ffff:ffff") == 429
    assert await wrong("2001:db8:a:c::1") == 401  # the next /64 is another subscriber
