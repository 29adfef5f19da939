"""Settings of the server process (API + controller + scheduler), declared once.

Each field of :class:`ServerSettings` carries its flag's help (and, where it is not plain text or
a number, how to parse it); :func:`parse_server_args` builds the command line from the fields,
so a setting, its default, its flag and its ``DPIP_*`` variable cannot drift apart.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

from api.connections import ConnectionPolicy, connections_for
from api.net import Network, parse_cidrs
from common.config import (
    API_PORT,
    CONTROLLER_PORT,
    EnvDefaultsParser,
    add_options,
    option,
    parse_range,
    secrets_in_flags,
)
from common.models import Limits
from imaging.formats import MAX_PIXELS
from scheduler.carrier import SchedulerSettings
from storage import engines
from storage.engines import FILES, POSTGRES, S3, SQLITE

#: The scheduler's own defaults, which its flags take.
SCHEDULING = SchedulerSettings()

#: Flags that carry a secret (visible to every local user in the process's command line), and
#: the variable to give it in instead.
SECRET_FLAGS = {"--admin-password": "DPIP_ADMIN_PASSWORD", "--join-token": "DPIP_JOIN_TOKEN"}



@dataclass(frozen=True)
class ServerSettings:
    host: str = option("127.0.0.1", "address for the API and the controller (0.0.0.0: all)")
    port: int = option(API_PORT, "HTTP API port")
    controller_port: int = option(CONTROLLER_PORT, "nng controller port")
    data_dir: Path = option(Path("data"), "SQLite file and images live here (by default)")
    database: str = option("", "the datastore: sqlite:///PATH (default: <data-dir>/dpip.sqlite3) or"
                               " postgresql://USER[:PASSWORD]@HOST:PORT/DB (several servers may share one)",
                           metavar="URL")
    image_store: str = option("", "where images live: file://DIR (default: <data-dir>/images) or"
                                  " s3://BUCKET[/PREFIX] (endpoint, keys and region from AWS_ENDPOINT_URL,"
                                  " AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION)",
                              metavar="URL")
    redirect_downloads: bool = option(False, "answer GET /images/{id} with a redirect to a short-lived"
                                             " presigned URL of the object store (s3:// only)")
    server_name: str = option("", "this server's name among those sharing a database (default: host"
                                  " name and API port)")
    lease_ttl: float = option(3.0, "seconds the scheduling server's lease lasts unrenewed: a standby"
                                   " takes over after it (shared databases only)")
    public_url: str = option("", "URL workers use for the API (default: controller host + API port;"
                                 " https:// with --tls-cert)")
    tls_cert: str = option("", "PEM certificate: the API serves HTTPS and the controller tls+tcp:// with it,"
                               " and it proves this server to workers (make one: main.py certs init)",
                           metavar="PEM")
    tls_key: str = option("", "PEM private key of --tls-cert", metavar="PEM")
    tls_client_ca: str = option("", "PEM CA: a worker must present a certificate it signed, naming the"
                                    " worker, or it never becomes a member (mutual TLS)", metavar="PEM")
    admin_user: str = option("admin", "admin user created on first start")
    admin_password: str = option("", "its password (default: generated, saved in the data dir)")
    token_ttl: float = option(24 * 3600.0, "token lifetime in seconds")
    heartbeat_interval: float = option(1.0, "seconds between worker heartbeats, told to workers")
    worker_ttl: float = option(0.0, "a worker silent this long is dead (default: 3 heartbeat intervals)")
    forget_after: float = option(600.0, "seconds after which a dead worker is forgotten (leaves /status)")
    max_workers: int = option(1000, "most workers tracked at once; joins beyond it are refused")
    job_timeout: float = option(SCHEDULING.job_timeout, "longest a job attempt may take")
    max_attempts: int = option(SCHEDULING.max_attempts, "attempts before a job fails")
    login_failures: int = option(5, "failed logins allowed per user and address per minute (4x per address;"
                                    " past 4x per user across addresses in a day, new places are slowed)")
    login_slowdown: float = option(2.0, "seconds an attempt from a place new to its user waits while the account is past"
                                         " its budget of failed logins (20 a day): slows a spray, refuses no one")
    trusted_proxies: tuple[Network, ...] = option(
        (), "reverse proxies whose X-Forwarded-For gives the client address (for login throttling and"
            " the like); from anyone else the header is ignored",
        flag="--trusted-proxy", parse=parse_cidrs, metavar="CIDR[,CIDR]")
    hedge: str = option(SCHEDULING.hedge.value, "tail-latency policy: a second copy after the recent p95 (hedged), two"
                                  " copies at once that cancel each other on start (tied), or none",
                        choices=("off", "hedged", "tied"))
    hedge_quantile: float = option(SCHEDULING.hedge_quantile, "hedge once a job is slower than this quantile of recent ones")
    hedge_floor_ms: float = option(SCHEDULING.hedge_floor * 1000, "never hedge sooner than this")
    hedge_initial_ms: float = option(SCHEDULING.hedge_initial * 1000, "hedge delay until 20 latencies of a size are known")
    max_upload_bytes: int = option(32 * 1024 * 1024, "largest accepted upload")
    inline_max_bytes: int = option(SCHEDULING.inline_max_bytes, "images up to this size travel with their jobs over"
                                   " the worker plane; larger ones over HTTP with a job capability (0: all over"
                                   " HTTP)")
    quota_bytes: int = option(0, "bytes of images (originals and results) each user may keep; 0: no quota")
    retain_days: float = option(0.0, "remove completed workloads created more than this many days ago"
                                     " (their images too); 0: keep everything")
    max_pixels: int = option(MAX_PIXELS, "largest image accepted or decoded, in pixels (width x height); every"
                                         " image a pipeline's step makes too")
    max_pixel_steps: int = option(0, "a job's budget: pixels of each step's image, summed over its steps and"
                                     " frames (default: 4 x --max-pixels); a pipeline that would pass it is"
                                     " refused")
    fsync: bool = option(True, "do not fsync uploads (faster, but a power cut may lose accepted ones)",
                         flag="--no-fsync")
    join_token: str = option("", "workers must present it (default: generated once and kept in the data"
                                 " dir as join-token; workers on this machine find it by themselves;"
                                 " better given as DPIP_JOIN_TOKEN than on the command line)")
    system_name: str = option("DPIP", None)
    access_log: bool = option(False, "log every HTTP request (off by default: it costs time on busy systems)")
    autoscale: tuple[int, int] | None = option(
        None, "start and retire workers with the load, between MIN and MAX (e.g. 0:4)",
        parse=parse_range, metavar="MIN:MAX")
    idle_timeout: float = option(30.0, "seconds an autoscaled worker may stay idle before it is retired")
    autoscale_worker_args: str = option("", 'extra flags for autoscaled local workers, e.g. "--capacity 2'
                                            ' --tags big"')
    scale_up_cmd: str = option("", "shell command that starts a worker elsewhere; {name} and {controller}"
                                   " are filled in")
    scale_down_cmd: str = option("", "shell command that stops worker {name}")
    # Slow clients (api/connections.py; Apache's RequestReadTimeout header=20-40,MinRate=500
    # body=20,MinRate=500, nginx's keep-alive 75 s). A timeout of 0 is off.
    header_timeout: float = option(20.0, "seconds a request's headers may take from their first byte (from"
                                         " the connection on a fresh one), plus 1 s per --min-rate bytes"
                                         " received, at most twice this; then 408 and closed; 0: no limit")
    body_timeout: float = option(20.0, "seconds a request's body may keep its handler waiting, plus 1 s per"
                                       " --min-rate bytes received; then closed; 0: no limit")
    min_rate: float = option(500.0, "bytes a second that earn a slow client 1 s more for headers and body")
    keepalive_timeout: float = option(75.0, "seconds an idle connection stays open between requests"
                                            " (0: closed after each response)")
    send_timeout: float = option(60.0, "seconds a client may leave our response unread (writes stalled)"
                                       " before its connection is reset; 0: no limit")
    max_connections: int = option(0, "client connections at once; 0: from the open-file limit (raised to"
                                     " its hard limit at start): half of what 128 kept for the server leave")
    max_connections_per_address: int = option(256, "connections at once from one address (an IPv6 /64 is"
                                                   " one; --trusted-proxy ones are exempt), at most half of"
                                                   " --max-connections; beyond it a 503")

    @property
    def limits(self) -> Limits:
        """What one job may make and spend (the API checks a pipeline, the workers are told)."""
        return Limits.of(self.max_pixels, self.max_pixel_steps)

    @property
    def db_path(self) -> Path:
        """The SQLite file (when the datastore is SQLite)."""
        return engines.sqlite_path(self.database, self.data_dir)

    @property
    def uses_sqlite(self) -> bool:
        return engines.is_sqlite(self.database)

    @property
    def images_dir(self) -> Path:
        """The images' directory (when they are files)."""
        if self.image_store.startswith(FILES):
            return Path(self.image_store[len(FILES):])
        return self.data_dir / "images"

    @property
    def incoming_dir(self) -> Path:
        """Uploads being received (files only): beside the images, on the same filesystem."""
        if self.image_store.startswith(FILES):
            return self.images_dir.with_name(self.images_dir.name + ".incoming")
        return self.data_dir / "incoming"

    @property
    def uses_s3(self) -> bool:
        return self.image_store.startswith(S3)

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def scheme(self) -> str:
        """The API's URL scheme."""
        return "https" if self.uses_tls else "http"

    def name(self) -> str:
        """This server's name among several."""
        return self.server_name or f"{socket.gethostname()}:{self.port}"


def parse_server_args(argv: list[str] | None = None) -> tuple[ServerSettings, str]:
    """Parse ``main.py``'s flags (built from :class:`ServerSettings`); returns the settings and
    the log level."""
    p = EnvDefaultsParser(prog="main.py", description="DPIP server: HTTP API, controller and scheduler.")
    fields = add_options(p, ServerSettings)
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    settings = ServerSettings(**{f.name: getattr(a, f.name) for f in fields})
    if bool(settings.scale_up_cmd) != bool(settings.scale_down_cmd):
        p.error("--scale-up-cmd and --scale-down-cmd go together")
    if settings.scale_up_cmd and settings.autoscale is None:
        p.error("--scale-up-cmd needs --autoscale MIN:MAX")
    if settings.idle_timeout <= 0:
        p.error("--idle-timeout must be positive")
    if settings.max_pixels <= 0:
        p.error("--max-pixels must be positive")
    if not 0 <= settings.login_slowdown <= 60:
        p.error("--login-slowdown must be between 0 and 60 seconds")
    if settings.max_pixel_steps < 0:
        p.error("--max-pixel-steps must be positive (or 0: the default)")
    if settings.database and not settings.database.startswith((SQLITE, *POSTGRES)):
        p.error("--database is sqlite:///PATH or postgresql://USER[:PASSWORD]@HOST:PORT/DB")
    if settings.image_store and not settings.image_store.startswith((FILES, S3)):
        p.error("--image-store is file://DIR or s3://BUCKET[/PREFIX]")
    if settings.image_store == S3 or settings.image_store.startswith(S3 + "/"):
        p.error("--image-store s3:// needs a bucket name: s3://BUCKET[/PREFIX]")
    if settings.redirect_downloads and not settings.uses_s3:
        p.error("--redirect-downloads needs --image-store s3://...")
    if settings.quota_bytes < 0 or settings.retain_days < 0:
        p.error("--quota-bytes and --retain-days are 0 (off) or positive")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if settings.tls_client_ca and not settings.tls_cert:
        p.error("--tls-client-ca needs --tls-cert and --tls-key (the worker plane is TLS first)")
    if settings.uses_tls and settings.public_url.startswith("http://"):
        p.error("--public-url must be https:// with --tls-cert: workers would send tokens and images in clear")
    if settings.uses_tls and settings.autoscale is not None and not settings.scale_up_cmd:
        p.error("--autoscale with local workers does not run with --tls-cert yet: give --scale-up-cmd and"
                " --scale-down-cmd that start workers with their --tls-ca (and certificates)")
    if not 0.5 <= settings.lease_ttl <= 3.0:
        p.error("--lease-ttl must be between 0.5 and 3 seconds")
    return settings, a.log_level


def connection_policy(s: ServerSettings, fd_limit: int) -> ConnectionPolicy:
    """The client connections' deadlines and caps these settings ask for; the total from the
    open-file limit unless given, no address more than half of it."""
    total = s.max_connections if s.max_connections > 0 else connections_for(fd_limit)
    per_address = s.max_connections_per_address if s.max_connections_per_address > 0 else total
    return ConnectionPolicy(header_timeout=s.header_timeout, body_timeout=s.body_timeout, min_rate=s.min_rate,
                            keepalive_timeout=s.keepalive_timeout, send_timeout=s.send_timeout,
                            max_connections=total, max_per_address=max(1, min(per_address, total // 2)),
                            unlimited=s.trusted_proxies)


def secret_warnings(argv: list[str], s: ServerSettings) -> list[str]:
    """What to warn of: secrets given as flags (a database URL only if it has a password)."""
    warnings = secrets_in_flags(argv, SECRET_FLAGS)
    if re.search(r"://[^/@:]*:[^/@]+@", s.database) and any(a.split("=", 1)[0] == "--database" for a in argv):
        warnings += secrets_in_flags(["--database"], {"--database": "DPIP_DATABASE (or PGPASSWORD for the password)"})
    return warnings
