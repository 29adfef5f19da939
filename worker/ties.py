"""Tied requests on a worker (Dean and Barroso's "tied requests"): two copies of a job go to two
workers, each told of the other; the first to start cancels the other, which then does no work.
A worker keeps each tied copy's secret (the peer must show it to cancel), the cancels that came
before their copy (tombstones, bounded and short-lived), and a client per peer to cancel with."""

from __future__ import annotations

import hmac
import logging
import time

from plane import wire
from plane.rpc import RpcClient, RpcError
from plane.tls import WorkerTls, is_tls

logger = logging.getLogger(__name__)

#: Early cancels kept at most, and for how long (seconds).
MAX_TOMBSTONES = 1024
TOMBSTONE_TTL = 60.0


class Untied(Exception):
    """A peer's cancel that cannot be taken (wrong secret, too many early ones)."""


class Ties:
    def __init__(self, tls: WorkerTls | None) -> None:
        self.tls = tls
        self._tombstones: dict[tuple[int, str], float] = {}  # (job, tie) -> when: cancelled early
        self._ties: dict[int, str] = {}  # job -> the tie secret a tied peer must show to cancel it
        self._peers: dict[str, RpcClient] = {}  # tied peers' RPC addresses

    def close(self) -> None:
        for client in self._peers.values():
            client.close()

    def tie(self, job_id: int, tie: str) -> None:
        self._ties[job_id] = tie

    def forget(self, job_id: int) -> None:
        self._ties.pop(job_id, None)

    def cancelled_early(self, job_id: int, tie: str) -> bool:
        """Whether the peer cancelled this copy before it arrived (the tombstone is taken)."""
        return bool(tie) and self._tombstones.pop((job_id, tie), None) is not None

    def peer_may_cancel(self, msg: wire.CancelJob) -> bool:
        """True if ``msg`` may cancel the running copy it names (its secret is right); False if
        no copy of it is here yet (a tombstone now stands for it); :class:`Untied` otherwise."""
        tie = self._ties.get(msg.job_id)
        if tie is not None:
            if not hmac.compare_digest(tie, msg.tie):
                raise Untied("refused: wrong tie secret")
            return True
        now = time.monotonic()
        for key, t in list(self._tombstones.items()):
            if now - t > TOMBSTONE_TTL:
                del self._tombstones[key]
        if len(self._tombstones) >= MAX_TOMBSTONES:
            raise Untied("refused: too many early cancels")
        self._tombstones[(msg.job_id, msg.tie)] = now  # a made-up tie never matches a copy
        return False

    async def cancel_peer(self, msg: wire.RunJob) -> None:
        """We started, so the other copy need not (unless it started too)."""
        client = self._peers.get(msg.tied_peer)
        if client is None:
            tls = self.tls.peer() if self.tls is not None and is_tls(msg.tied_peer) else None
            client = self._peers[msg.tied_peer] = RpcClient(msg.tied_peer, timeout=2.0, tls=tls)
        try:
            await client.call(wire.CancelJob(msg.job_id, if_not_started=True, tie=msg.tie))
        except RpcError as e:
            logger.debug("could not cancel job %d at tied peer %s: %s", msg.job_id, msg.tied_peer, e)
