"""Tables a person can read (rich); ``--json`` prints the server's JSON instead."""

from __future__ import annotations

import json
import sys
import time

from rich.console import Console
from rich.table import Table

from cli import pushes

#: Piped output gets a wide console rather than 80 columns of truncated cells.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def as_json(data: object) -> None:
    print(json.dumps(data, indent=2))


def _bar(percent: float | None, width: int = 10) -> str:
    if percent is None:
        return "-"
    filled = round(max(0.0, min(100.0, percent)) / 100 * width)
    return f"{'█' * filled}{'·' * (width - filled)} {percent:5.1f}%"


def _gpu(gpu: object) -> str:
    if not gpu:
        return "none"
    if isinstance(gpu, dict) and gpu.get("count"):
        return f"{gpu['count']}× {gpu.get('utilization_percent', 0):.0f}%"
    return "none"


def _ago(stamp: object) -> str:
    if not isinstance(stamp, (int, float)):
        return str(stamp or "-")
    seconds = max(0.0, time.time() - stamp)
    return f"{seconds:.0f}s ago" if seconds < 120 else time.strftime("%H:%M:%S", time.localtime(stamp))


def workers_table(workers: list[dict]) -> Table:
    table = Table(title=f"workers ({sum(w.get('alive', False) for w in workers)} alive)", title_justify="left")
    for col in ("name", "alive", "tags", "cpu", "memory", "gpu", "running", "capacity", "done", "last seen", "autoscaled"):
        table.add_column(col, justify="right" if col in ("running", "capacity", "done") else "left")
    for w in workers:
        table.add_row(
            w["name"], "yes" if w.get("alive") else "[red]no[/red]", ",".join(w.get("tags", [])) or "-",
            _bar(w.get("cpu_percent")), _bar(w.get("memory_percent")), _gpu(w.get("gpu")),
            str(w.get("running_jobs", 0)), str(w.get("capacity", "-")), str(w.get("jobs_done", 0)),
            _ago(w.get("last_seen")), "yes" if w.get("autoscaled") else "",
        )
    return table


def filters_table(listed: list[dict]) -> Table:
    table = Table(title=f"filters ({len(listed)})", title_justify="left")
    for col in ("name", "parameters", "workers", "where", "help"):
        table.add_column(col, justify="right" if col == "workers" else "left")
    for f in listed:
        params = ", ".join(_param(p) for p in f.get("params", [])) or "-"
        where = ", ".join(f"{o['worker']}{' ' + o['version'] if o.get('version') else ''}{' (gpu)' if o.get('gpu') else ''}"
                          for o in f.get("offered_by", [])) or "-"
        workers = f.get("workers", 0)
        table.add_row(f["name"], params, str(workers) if workers else "[red]0[/red]", where, f.get("help", ""))
    return table


def _param(p: dict) -> str:
    if p.get("type") == "string":
        return f"{p['name']}={'|'.join(p.get('enum', []))}"
    return f"{p['name']}={p.get('minimum', '')}..{p.get('maximum', '')}"


def workloads_table(workloads: list[dict], title: str = "workloads") -> Table:
    table = Table(title=f"{title} ({len(workloads)})", title_justify="left")
    for col in ("workload_id", "name", "filter", "status", "images", "filtered", "failed", "running"):
        table.add_column(col, justify="right" if col in ("images", "filtered", "failed", "running") else "left")
    for w in workloads:
        state = pushes.status(w)
        table.add_row(
            w["workload_id"], w["workload_name"], w["filter"],
            f"[yellow]{state}[/yellow]" if state == "partial" else state, pushes.uploaded(w),
            str(len(w["filtered_images"])), str(len(w.get("failed_images", []))), str(w["running_jobs"]),
        )
    return table


def status(body: dict, url: str) -> None:
    out.print(f"{body['system_name']} at {url}, server time {body['server_time']}, "
              f"{body.get('queued_jobs', 0)} jobs queued")
    if scale := body.get("autoscale"):
        last = scale["last_action"]
        out.print(f"autoscale {scale['minimum']}..{scale['maximum']} ({scale['provisioner']}): "
                  f"{len(scale['workers'])} running; last {last['action']}: {last['reason']}")
    out.print(workers_table(body["workers"]))
    out.print(workloads_table(body["active_workloads"], "active workloads"))
