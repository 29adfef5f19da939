"""Login throttling: too many failed logins for a user from an address, from an address at all,
or for an account from everywhere, and further attempts get 429 with Retry-After until the
limit's window (or its backoff) has passed.

Addresses count by their group (:func:`api.net.address_group`): an IPv4 address itself, an
IPv6 address its /64, which one subscriber owns whole and can pick any address of.

The account's budget slows a spray from many addresses, each under its own limits, without
refusing anyone: past ``account_failures`` failures within a day, each attempt for that user
from an unfamiliar place waits :data:`ACCOUNT_DELAY` seconds before its password is checked.
Only the per-address and per-user-and-address limits refuse (429), so an attacker elsewhere can
block only the addresses it uses, never the owner's. An address group the user logged in from
within 30 days (kept in the datastore, so across restarts and on every server of the system) is
spared the delay too. ``main.py users unlock NAME`` forgives a user's failures on every server.

An attempt counts as a failure from the moment it starts (its password hash takes a while, and
attempts sent at once would otherwise all pass the check before any had failed); a success takes
it back. Few attempts per user and address may be under way at once; others wait their turn.

Memory is bounded: each limiter keeps at most ``MAX_KEYS`` keys and, when full, forgets the least
recently failed, stepping over blocked keys (those are the ones that matter), so a spray of new
keys cannot wipe the counts of the keys it is meant to free.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from api.net import address_group
from common.models import TooManyRequests

logger = logging.getLogger(__name__)

DAY = 86400.0
#: Keys per limiter (and remembered logins): ~100 bytes of stamps each, some 10 MB in all.
MAX_KEYS = 100_000
#: Blocked keys one eviction may step over (moving them to the back) before it evicts anyway.
SPARED_PER_EVICTION = 4
#: Stamps kept per key beyond its limit: past them the backoff is long at its cap anyway.
EXTRA_STAMPS = 64
#: Seconds an attempt from an unfamiliar place waits while its account is past its budget: a
#: guess costs the attacker this much more, the owner one short pause, and no one is refused.
ACCOUNT_DELAY = 2.0


class FailureLimiter:
    """At most ``limit`` failures per key within ``window`` seconds. With ``backoff``, a key at
    its limit is also free again ``backoff`` seconds after its latest failure, a wait doubled for
    each failure beyond the limit, up to ``max_backoff``: whichever comes first. Pure apart from
    the clock."""

    def __init__(self, limit: int, window: float, clock: Callable[[], float] = time.monotonic,
                 backoff: float | None = None, max_backoff: float = 3600.0, max_keys: int = MAX_KEYS) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_keys = max_keys
        self.evicted = 0  # live keys forgotten for room
        self._failures: OrderedDict[object, deque[float]] = OrderedDict()  # least recently failed first

    def retry_after(self, key: object) -> float:
        """Seconds until ``key`` may try again; 0 if it may now."""
        q = self._prune(key)
        if q is None or len(q) < self.limit:
            return 0.0
        free_at = q[-self.limit] + self.window  # when the count falls under the limit
        if self.backoff is not None:
            free_at = min(free_at, q[-1] + min(self.max_backoff, self.backoff * 2.0 ** min(len(q) - self.limit, 64)))
        return max(0.0, free_at - self.clock())

    def failed(self, key: object) -> float:
        """Count a failure (or an attempt not yet known to succeed); returns its time stamp."""
        q = self._prune(key)
        if q is None:
            self._make_room()
            q = self._failures[key] = deque(maxlen=self.limit + EXTRA_STAMPS)
        else:
            self._failures.move_to_end(key)
        stamp = self.clock()
        q.append(stamp)
        return stamp

    def forget(self, key: object, stamp: float) -> None:
        """Take back one failure counted by :meth:`failed` (the attempt succeeded after all)."""
        q = self._failures.get(key)
        if q is not None and stamp in q:
            q.remove(stamp)
            if not q:
                del self._failures[key]

    def succeeded(self, key: object) -> None:
        self._failures.pop(key, None)

    def forget_all(self, which: Callable[[object], bool]) -> None:
        """Drop every key ``which`` says (an unlocked user's, from all addresses)."""
        for key in [k for k in self._failures if which(k)]:
            del self._failures[key]

    def __len__(self) -> int:
        return len(self._failures)

    def __contains__(self, key: object) -> bool:
        return key in self._failures

    def _prune(self, key: object) -> deque[float] | None:
        q = self._failures.get(key)
        if q is None:
            return None
        _drop_older(q, self.clock() - self.window)
        if not q:
            del self._failures[key]
            return None
        return q

    def _make_room(self) -> None:
        """Room for one more key: expired keys at the front go, then the least recently failed
        that is not blocked (a few blocked ones are moved to the back on the way)."""
        failures, cutoff = self._failures, self.clock() - self.window
        while failures:
            key, q = next(iter(failures.items()))
            if q[-1] > cutoff:
                break
            del failures[key]
        spared = 0
        while len(failures) >= self.max_keys:
            key, q = next(iter(failures.items()))
            _drop_older(q, cutoff)
            if q and len(q) >= self.limit and spared < SPARED_PER_EVICTION:
                failures.move_to_end(key)
                spared += 1
                continue
            del failures[key]
            if q:
                if not self.evicted:
                    logger.warning("login limiter full (%d keys): forgetting the least recently failed",
                                   self.max_keys)
                self.evicted += 1


def _drop_older(q: deque[float], cutoff: float) -> None:
    while q and q[0] <= cutoff:
        q.popleft()


class RecentLogins:
    """The address groups each user logged in from, each for ``remember`` seconds after its
    latest success; at most ``max_keys`` (user, group) pairs, the least recent forgotten first."""

    def __init__(self, remember: float, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = MAX_KEYS) -> None:
        self.remember = remember
        self.clock = clock
        self.max_keys = max_keys
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()  # least recent first

    def add(self, user: str, group: str) -> None:
        now = self.clock()
        self._seen[(user, group)] = now
        self._seen.move_to_end((user, group))
        while self._seen:
            oldest, seen = next(iter(self._seen.items()))
            if now - seen < self.remember and len(self._seen) <= self.max_keys:
                break
            del self._seen[oldest]

    def __contains__(self, pair: tuple[str, str]) -> bool:
        seen = self._seen.get(pair)
        return seen is not None and self.clock() - seen < self.remember


@dataclass(frozen=True)
class LoginAttempt:
    """A login under way: what :meth:`LoginThrottle.begin` counted, for :meth:`LoginThrottle.end`."""

    user: str
    group: str  # the address's group
    address_stamp: float  # its failures in the per-address and per-account counts, taken back on success
    account_stamp: float


class LoginThrottle:
    """Failed logins per (user, address), per address and per account; logins under way per
    (user, address).

    An attempt that would pass the limits only if those under way succeed waits for them (a
    few hundred ms: many clients behind one address may log in at once); one that the failures
    already block, or that would wait too long or among too many, gets 429 at once.
    """

    def __init__(self, failures: int, window: float = 60.0, max_in_flight: int = 2,
                 max_waiting: int = 32, max_wait: float = 10.0, account_failures: int | None = None,
                 account_window: float = DAY, max_backoff: float = 3600.0, remember: float = 30 * DAY,
                 clock: Callable[[], float] = time.monotonic, account_delay: float = ACCOUNT_DELAY,
                 on_slowed: Callable[[], None] = lambda: None) -> None:
        self.per_user = FailureLimiter(failures, window, clock)
        self.per_address = FailureLimiter(4 * failures, window, clock)
        self.per_account = FailureLimiter(4 * failures if account_failures is None else account_failures,
                                          account_window, clock, backoff=window, max_backoff=max_backoff)
        self.known = RecentLogins(remember, clock)  # where each user logged in from: spared the account's budget
        self.max_in_flight = max_in_flight
        self.max_waiting = max_waiting  # per address; 8x per account
        self.max_wait = max_wait
        self._in_flight: dict[tuple, int] = {}  # by ("pair", user, group), ("group", group), ("account", user)
        self._waiting: dict[tuple, int] = {}  # by ("group", group), ("account", user)
        self._ended = asyncio.Event()  # replaced by a fresh one each time an attempt ends
        self._unlocked: dict[str, float] = {}  # user -> the unlock this server applied last
        self.account_delay = account_delay
        self.slowed = 0  # attempts made to wait for the account's sake
        self._on_slowed = on_slowed

    async def begin(self, user: str, address: str, familiar: Callable[[str], Awaitable[bool]] | None = None,
                    unlocked: Callable[[], Awaitable[float]] | None = None) -> LoginAttempt:
        """Admit an attempt, counted as failed until :meth:`end` says otherwise, or raise
        :class:`TooManyRequests`. Check and count happen with no await between them, so
        concurrent attempts cannot all pass the check before any has failed. ``familiar(group)``
        asks the datastore whether the user logged in from there before; ``unlocked()`` when an
        admin last forgave the user's failures (both asked only when they would matter)."""
        group = address_group(address)
        pair, by_group, by_account = ("pair", user, group), ("group", group), ("account", user)
        known = (user, group) in self.known
        if not known and familiar is not None and self.per_account.retry_after(user):
            known = await familiar(group)
            if known:
                self.known.add(user, group)
        slowed = known
        asked_unlock = unlocked is None
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while True:
            waits = {pair: self.per_user.retry_after((user, group)), by_group: self.per_address.retry_after(group)}
            if waits[pair] and not asked_unlock:
                asked_unlock = True
                assert unlocked is not None
                if self._forgive(user, await unlocked()):
                    continue
            if not any(waits.values()) and self._in_flight.get(pair, 0) < self.max_in_flight:
                if not slowed and self.per_account.retry_after(user):
                    slowed = True  # past the account's budget: slowed down, never refused
                    await self._slow_down(by_group, deadline)
                    continue
                return self._admit(user, group)
            if any(wait and not self._in_flight.get(key) for key, wait in waits.items()):
                wait = max(waits.values())  # real failures, not attempts under way
                raise TooManyRequests(f"too many failed logins: try again in {wait:.0f} s", wait)
            await self._wait_for_an_end(by_group, by_account, deadline)

    async def _slow_down(self, by_group: tuple, deadline: float) -> None:
        """Wait ``account_delay`` (counted among the address's waiting attempts, which are
        bounded; not the account's, which an attacker could fill)."""
        if self._waiting.get(by_group, 0) >= self.max_waiting:
            raise TooManyRequests("too many logins at once: try again in 1 s", 1.0)
        self._waiting[by_group] = self._waiting.get(by_group, 0) + 1
        self.slowed += 1
        self._on_slowed()
        try:
            await asyncio.sleep(min(self.account_delay, max(0.0, deadline - asyncio.get_running_loop().time())))
        finally:
            _decrement(self._waiting, by_group)

    def _forgive(self, user: str, stamp: float) -> bool:
        """Forget ``user``'s failures if an admin unlocked the account (at ``stamp``, wall
        clock) since this server last looked; whether it did."""
        if stamp <= self._unlocked.get(user, 0.0):
            return False
        self._unlocked[user] = stamp
        self.per_user.forget_all(lambda key: key[0] == user)
        self.per_account.succeeded(user)
        logger.info("the failed logins of %r are forgiven (main.py users unlock)", user[:64])
        return True

    async def _wait_for_an_end(self, by_group: tuple, by_account: tuple, deadline: float) -> None:
        left = deadline - asyncio.get_running_loop().time()
        if (left <= 0 or self._waiting.get(by_group, 0) >= self.max_waiting
                or self._waiting.get(by_account, 0) >= 8 * self.max_waiting):
            raise TooManyRequests("too many logins at once: try again in 1 s", 1.0)
        for key in (by_group, by_account):
            self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            await asyncio.wait_for(self._ended.wait(), left)
        except TimeoutError as e:
            raise TooManyRequests("too many logins at once: try again in 1 s", 1.0) from e
        finally:
            for key in (by_group, by_account):
                _decrement(self._waiting, key)

    def _admit(self, user: str, group: str) -> LoginAttempt:
        for key in _in_flight_keys(user, group):
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
        self.per_user.failed((user, group))
        return LoginAttempt(user, group, self.per_address.failed(group), self.per_account.failed(user))

    def end(self, attempt: LoginAttempt, ok: bool) -> None:
        """The attempt is over: a success clears the user's failures from that address, takes
        back its own, and makes the address one the user logs in from."""
        for key in _in_flight_keys(attempt.user, attempt.group):
            _decrement(self._in_flight, key)
        if ok:
            self.per_user.succeeded((attempt.user, attempt.group))
            self.per_address.forget(attempt.group, attempt.address_stamp)
            self.per_account.forget(attempt.user, attempt.account_stamp)  # not the others': they may be an attack
            self.known.add(attempt.user, attempt.group)
        self._ended.set()  # the waiters look again
        self._ended = asyncio.Event()


def _in_flight_keys(user: str, group: str) -> tuple[tuple, ...]:
    return ("pair", user, group), ("group", group), ("account", user)


def _decrement(counts: dict, key: object) -> None:
    left = counts.pop(key, 1) - 1
    if left > 0:
        counts[key] = left
