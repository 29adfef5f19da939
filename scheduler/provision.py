"""Provisioners: how the autoscaler gets a worker started and stopped.

- :class:`LocalProcesses` starts ``python -m worker`` on this machine, and stops it with SIGTERM
  (the worker drains: finishes its jobs, says goodbye, exits), SIGKILL if it hangs.
- :class:`ExternalCommand` runs the operator's commands (``--scale-up-cmd``,
  ``--scale-down-cmd``) through ``/bin/sh``, with ``{name}`` and ``{controller}`` replaced (and
  ``$DPIP_WORKER_NAME``, ``$DPIP_CONTROLLER`` set), to start workers anywhere: ssh, a cloud
  CLI, a container runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import sys
from abc import ABC, abstractmethod
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE = 15.0  # seconds a retired worker may take to drain before SIGKILL
COMMAND_TIMEOUT = 120.0


class ProvisionError(Exception):
    """A worker could not be started."""


class Provisioner(ABC):
    @abstractmethod
    async def launch(self, name: str) -> None:
        """Start worker ``name``; return once it is on its way (it joins by itself)."""

    @abstractmethod
    async def retire(self, name: str) -> None:
        """Stop worker ``name`` (gracefully: it finishes what it holds)."""

    def exited(self, name: str) -> bool:
        """True if we know the worker's process has ended (local processes only)."""
        return False

    async def close(self) -> None:
        """The server stops: stop what we started, if we can."""

    @abstractmethod
    def describe(self) -> str: ...


class LocalProcesses(Provisioner):
    def __init__(self, controller: str, worker_args: list[str], log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.controller = controller
        self.worker_args = worker_args
        self.log_dir = log_dir
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    def describe(self) -> str:
        return "local processes"  # not the flags: shown to every user in /status

    async def launch(self, name: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "worker", "--controller", self.controller, "--worker-name", name,
                "--exit-with-parent", *self.worker_args]
        with open(self.log_dir / f"{name}.log", "ab") as log:
            try:
                self.procs[name] = await asyncio.create_subprocess_exec(
                    *argv, cwd=ROOT, env=self.env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
            except OSError as e:
                raise ProvisionError(f"cannot start {argv[0]}: {e}") from e
        logger.info("started worker %s (pid %d), log in %s", name, self.procs[name].pid, self.log_dir / f"{name}.log")

    def exited(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.returncode is not None

    async def retire(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE)
        except TimeoutError:
            logger.warning("worker %s did not stop within %.0f s: killing it", name, STOP_GRACE)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        finally:
            if proc.returncode is not None:
                self.procs.pop(name, None)

    async def close(self) -> None:
        await asyncio.gather(*(self.retire(name) for name in list(self.procs)), return_exceptions=True)


class ExternalCommand(Provisioner):
    def __init__(self, up: str, down: str, controller: str, log_dir: Path, join_token: str = "") -> None:
        self.up, self.down, self.controller = up, down, controller
        self.join_token = join_token
        self.log = log_dir / "commands.log"
        self.started: set[str] = set()

    def describe(self) -> str:
        return "external commands"  # never the commands: they may hold secrets

    async def _run(self, template: str, name: str) -> None:
        command = template.replace("{name}", shlex.quote(name)).replace("{controller}", shlex.quote(self.controller))
        env = {**os.environ, "DPIP_WORKER_NAME": name, "DPIP_CONTROLLER": self.controller}
        if self.join_token:
            env["DPIP_JOIN_TOKEN"] = self.join_token  # for the command to hand on, never in its text
        self.log.parent.mkdir(parents=True, exist_ok=True)
        # Output goes to a file, not a pipe: a command that leaves a worker running in the
        # background would otherwise hold the pipe open, and us waiting, for its whole life.
        with open(self.log, "ab") as log:
            log.write(f"$ {command}\n".encode())
            log.flush()
            proc = await asyncio.create_subprocess_shell(
                command, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
        try:
            await asyncio.wait_for(proc.wait(), COMMAND_TIMEOUT)
        except TimeoutError as e:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise ProvisionError(f"the command for {name} took longer than {COMMAND_TIMEOUT:.0f} s") from e
        if proc.returncode != 0:
            raise ProvisionError(f"the command for {name} exited with {proc.returncode} (see {self.log})")
        logger.info("ran the command for %s (output in %s)", name, self.log)

    async def launch(self, name: str) -> None:
        self.started.add(name)  # from the start: a launch cut short by a stop is still retired
        await self._run(self.up, name)

    async def retire(self, name: str) -> None:
        try:
            await self._run(self.down, name)
        except ProvisionError as e:
            logger.error("could not retire worker %s: %s", name, e)
        self.started.discard(name)

    async def close(self) -> None:
        """Workers started elsewhere are stopped too: nobody else would pay for them."""
        await asyncio.gather(*(self.retire(name) for name in list(self.started)), return_exceptions=True)
