"""Settings of the server process (API + controller + scheduler), from flags and DPIP_* env."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from api.peer import Network, parse_cidrs
from common.config import EnvDefaultsParser
from scheduler.autoscale import parse_range


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    controller_port: int = 40899
    data_dir: Path = Path("data")
    public_url: str = ""  # what workers use to reach the API, if not controller-host:port
    admin_user: str = "admin"
    admin_password: str = ""  # empty: generate one on first start
    token_ttl: float = 24 * 3600.0
    heartbeat_interval: float = 1.0
    worker_ttl: float = 0.0  # silent this long = dead; 0 means 3 heartbeat intervals
    forget_after: float = 600.0  # a worker dead this long leaves /status
    max_workers: int = 1000  # workers tracked at most (alive or recently dead)
    job_timeout: float = 120.0
    max_attempts: int = 3
    login_failures: int = 5  # failed logins per user and address per minute (4x per address)
    trusted_proxies: tuple[Network, ...] = ()  # their X-Forwarded-For names the client address
    hedge: str = "hedged"  # off | hedged | tied
    hedge_quantile: float = 0.95
    hedge_floor_ms: float = 50.0
    hedge_initial_ms: float = 1000.0
    max_upload_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 50_000_000  # also Pillow's MAX_IMAGE_PIXELS in the server process
    fsync: bool = True
    join_token: str = ""  # workers must prove they know it; required off loopback
    system_name: str = "DPIP"
    access_log: bool = False
    autoscale: tuple[int, int] | None = None  # (MIN, MAX) workers the server starts itself
    idle_timeout: float = 30.0  # an autoscaled worker idle this long is retired
    autoscale_worker_args: str = ""  # extra flags for autoscaled local workers
    scale_up_cmd: str = ""  # start a worker elsewhere instead: {name}, {controller} substituted
    scale_down_cmd: str = ""

    @property
    def db_path(self) -> Path:
        return self.data_dir / "dpip.sqlite3"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def incoming_dir(self) -> Path:
        return self.data_dir / "incoming"


def parse_server_args(argv: list[str] | None = None) -> tuple[ServerSettings, str]:
    """Parse ``main.py``'s flags; returns the settings and the log level."""
    d = ServerSettings()
    p = EnvDefaultsParser(prog="main.py", description="DPIP server: HTTP API, controller and scheduler.")
    p.add_argument("--host", default=d.host, help="address for the API and the controller (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=d.port, help="HTTP API port")
    p.add_argument("--controller-port", type=int, default=d.controller_port, help="nng controller port")
    p.add_argument("--data-dir", type=Path, default=d.data_dir, help="SQLite file and images live here")
    p.add_argument("--public-url", default="", help="URL workers use for the API (default: controller host + API port)")
    p.add_argument("--admin-user", default=d.admin_user, help="admin user created on first start")
    p.add_argument("--admin-password", default="", help="its password (default: generated, saved in the data dir)")
    p.add_argument("--token-ttl", type=float, default=d.token_ttl, help="token lifetime in seconds")
    p.add_argument("--heartbeat-interval", type=float, default=d.heartbeat_interval,
                   help="seconds between worker heartbeats, told to workers")
    p.add_argument("--worker-ttl", type=float, default=d.worker_ttl,
                   help="a worker silent this long is dead (default: 3 heartbeat intervals)")
    p.add_argument("--forget-after", type=float, default=d.forget_after,
                   help="seconds after which a dead worker is forgotten (leaves /status)")
    p.add_argument("--max-workers", type=int, default=d.max_workers,
                   help="most workers tracked at once; joins beyond it are refused")
    p.add_argument("--job-timeout", type=float, default=d.job_timeout, help="longest a job attempt may take")
    p.add_argument("--max-attempts", type=int, default=d.max_attempts, help="attempts before a job fails")
    p.add_argument("--hedge", choices=["off", "hedged", "tied"], default=d.hedge,
                   help="tail-latency policy: a second copy after the recent p95 (hedged), two"
                        " copies at once that cancel each other on start (tied), or none")
    p.add_argument("--hedge-quantile", type=float, default=d.hedge_quantile,
                   help="hedge once a job is slower than this quantile of recent ones")
    p.add_argument("--hedge-floor-ms", type=float, default=d.hedge_floor_ms,
                   help="never hedge sooner than this")
    p.add_argument("--hedge-initial-ms", type=float, default=d.hedge_initial_ms,
                   help="hedge delay until 20 latencies of a size are known")
    p.add_argument("--login-failures", type=int, default=d.login_failures,
                   help="failed logins allowed per user and address per minute (4x per address)")
    p.add_argument("--trusted-proxy", default="", metavar="CIDR[,CIDR]",
                   help="reverse proxies whose X-Forwarded-For gives the client address (for login"
                        " throttling and the like); from anyone else the header is ignored")
    p.add_argument("--max-upload-bytes", type=int, default=d.max_upload_bytes, help="largest accepted upload")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help="largest image accepted or decoded, in pixels (width x height)")
    p.add_argument("--no-fsync", dest="fsync", action="store_false", default=True,
                   help="do not fsync uploads (faster, but a power cut may lose accepted ones)")
    p.add_argument("--join-token", default="",
                   help="workers must present it (generated and saved if unset and --host is not loopback)")
    p.add_argument("--access-log", action="store_true", default=False,
                   help="log every HTTP request (off by default: it costs time on busy systems)")
    p.add_argument("--autoscale", default="", metavar="MIN:MAX",
                   help="start and retire workers with the load, between MIN and MAX (e.g. 0:4)")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout,
                   help="seconds an autoscaled worker may stay idle before it is retired")
    p.add_argument("--autoscale-worker-args", default="",
                   help="extra flags for autoscaled local workers, e.g. \"--capacity 2 --tags big\"")
    p.add_argument("--scale-up-cmd", default="",
                   help="shell command that starts a worker elsewhere; {name} and {controller} are filled in")
    p.add_argument("--scale-down-cmd", default="", help="shell command that stops worker {name}")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    autoscale = None
    if a.autoscale:
        try:
            autoscale = parse_range(a.autoscale)
        except ValueError as e:
            p.error(str(e))
    if bool(a.scale_up_cmd) != bool(a.scale_down_cmd):
        p.error("--scale-up-cmd and --scale-down-cmd go together")
    if a.scale_up_cmd and autoscale is None:
        p.error("--scale-up-cmd needs --autoscale MIN:MAX")
    if a.idle_timeout <= 0:
        p.error("--idle-timeout must be positive")
    if a.max_pixels <= 0:
        p.error("--max-pixels must be positive")
    try:
        trusted_proxies = parse_cidrs(a.trusted_proxy)
    except ValueError as e:
        p.error(f"--trusted-proxy: {e}")
    settings = ServerSettings(
        host=a.host,
        port=a.port,
        controller_port=a.controller_port,
        data_dir=a.data_dir,
        public_url=a.public_url,
        admin_user=a.admin_user,
        admin_password=a.admin_password,
        token_ttl=a.token_ttl,
        heartbeat_interval=a.heartbeat_interval,
        worker_ttl=a.worker_ttl,
        forget_after=a.forget_after,
        max_workers=a.max_workers,
        job_timeout=a.job_timeout,
        max_attempts=a.max_attempts,
        login_failures=a.login_failures,
        trusted_proxies=trusted_proxies,
        hedge=a.hedge,
        hedge_quantile=a.hedge_quantile,
        hedge_floor_ms=a.hedge_floor_ms,
        hedge_initial_ms=a.hedge_initial_ms,
        max_upload_bytes=a.max_upload_bytes,
        max_pixels=a.max_pixels,
        fsync=a.fsync,
        join_token=a.join_token,
        access_log=a.access_log,
        autoscale=autoscale,
        idle_timeout=a.idle_timeout,
        autoscale_worker_args=a.autoscale_worker_args,
        scale_up_cmd=a.scale_up_cmd,
        scale_down_cmd=a.scale_down_cmd,
    )
    return settings, a.log_level
