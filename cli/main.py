"""The ``dpip`` entry point: parse the command line, run the command, and turn every failure into
one line on stderr and an exit code (see ``EXIT_*`` in :mod:`cli.session`), never a traceback.

The commands (aiohttp, rich, PyAV: half a second of imports) are imported only once the line
is parsed, inside the handlers: a Ctrl-C that early is an interruption like any other.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import sys
from fractions import Fraction
from pathlib import Path

from cli.session import EXIT_AUTH, EXIT_FAILED, EXIT_INTERRUPTED, CliError
from filtering import registry

DESCRIPTION = """\
Log in, push images or a video, watch the workers filter them, pull the results.

  dpip login                     the admin password is printed by make run, also in data/admin-password
  dpip push photos/              upload a directory of images; prints the workload id
  dpip watch WORKLOAD            progress until every image is filtered
  dpip pull WORKLOAD [DIR]       download the filtered images (into the current directory)
  dpip video run IN.mp4 OUT.mp4  all of it for a video

Every command has --help."""

EPILOG = """\
exit codes: 0 done; 1 failed (the server refused, images failed, a local file is bad);
2 bad usage; 3 not logged in, wrong password, or a session that expired or was revoked;
4 server unreachable; 130 interrupted (Ctrl-C). A failure is one line on stderr."""

STALL_HELP = ("give up on a partial workload (fewer images than its push announced) after S seconds"
              " without a new upload (default 30)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _param(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def parser() -> argparse.ArgumentParser:
    """The command line; each command names its function in :mod:`cli.commands`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="server address (default: the one you logged in to, or $DPIP_URL)")
    common.add_argument("--ca-file", metavar="PEM",
                        help="CA certificate(s) to trust for an https:// server (default: $DPIP_CA_FILE, else"
                             " the system's CAs)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    tables = argparse.ArgumentParser(add_help=False)
    tables.add_argument("--json", action="store_true", help="print the server's JSON instead of a table")
    jobs = argparse.ArgumentParser(add_help=False)
    jobs.add_argument("--jobs", "-j", type=_positive, default=4, metavar="K", help="transfers at a time (4)")
    stall = argparse.ArgumentParser(add_help=False)
    stall.add_argument("--stall-timeout", type=_seconds, default=30.0, metavar="S", help=STALL_HELP)
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument("--filter", "-f", default=registry.DEFAULT, metavar="PIPELINE",
                        help=f"a filter (default {registry.DEFAULT}; dpip filters lists what the fleet runs) or a"
                             " pipeline of up to 10 steps, e.g. 'resize(width=800)|sharpen|grayscale';"
                             " the server checks it")
    names = ", ".join(sorted(registry.param_names()))
    target.add_argument("--param", "-p", type=_param, action="append", metavar="NAME=VALUE",
                        help=f"a filter parameter, e.g. radius=5 for blur ({names}); the server checks it")
    target.add_argument("--name", "-n", help="workload name (default: generated)")
    target.add_argument("--tags", "-t", help="comma-separated worker tags the jobs require")
    target.add_argument("--workload", "-w", metavar="ID",
                        help="push into this existing workload (resumes an interrupted push)")

    p = argparse.ArgumentParser(prog="dpip", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: str, help: str, parents: list | None = None, into=sub) -> argparse.ArgumentParser:
        cmd = into.add_parser(name, help=help, description=help, parents=[common, *(parents or [])])
        cmd.set_defaults(run=fn)
        return cmd

    workload_arg = {"metavar": "WORKLOAD", "help": "the workload id (push prints it; dpip workloads lists them)"}
    login = add("login", "cmd_login", "log in and keep the token (the password comes from $DPIP_PASSWORD or a "
                                      "prompt; admin's is printed by make run, also in data/admin-password)")
    login.add_argument("--user", "-u", help="user name (default: the last one, else admin)")
    add("logout", "cmd_logout", "revoke the token and forget it")
    add("status", "cmd_status", "system name, workers and your active workloads", [tables])
    add("workers", "cmd_workers", "the workers: alive, tags, CPU, memory, GPU, jobs", [tables])
    add("filters", "cmd_filters", "the filters the fleet runs: parameters, and how many live workers run each",
        [tables])
    add("workloads", "cmd_workloads", "your workloads and their progress (partial: a push that stopped early)",
        [tables])
    push = add("push", "cmd_push", "upload image files or directories into a new workload; prints its id",
               [jobs, target])
    push.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                      help="image files, or directories (their image files, one level deep)")
    rm = add("rm", "cmd_rm", "delete workloads of yours: their running jobs stop, their images and files go")
    rm.add_argument("workloads", nargs="+", metavar="WORKLOAD",
                    help="workload ids (dpip workloads lists them), or names of yours")
    watch = add("watch", "cmd_watch", "show a workload's progress until it is completed", [stall])
    watch.add_argument("workload", **workload_arg)
    pull = add("pull", "cmd_pull", "download a workload's images (as <id>.<ext>, or the uploaded names);"
                                   " skips files already complete", [jobs, stall])
    pull.add_argument("workload", **workload_arg)
    pull.add_argument("dir", type=Path, metavar="DIR", nargs="?", default=Path("."),
                      help="where to write them (default: the current directory)")
    pull.add_argument("--type", choices=("filtered", "original"), default="filtered",
                      help="the filtered images (default) or the originals")
    pull.add_argument("--names", choices=("id", "original"), default="id",
                      help="file names: id gives <id>.<ext>, as the reference's pull client (default); original "
                           "gives the names the images were uploaded with, where the server knows them")
    pull.add_argument("--wait", action="store_true", help="wait until the workload is completed first")

    vid = sub.add_parser("video", help="video in, video out (push, pull, run, sample)",
                         description="video in, video out").add_subparsers(dest="video", required=True, metavar="COMMAND")
    vpush = add("push", "cmd_video_push", "decode a video and push its frames as they come; prints the workload id",
                [jobs, target], into=vid)
    vpush.add_argument("input", type=Path, metavar="IN", help="the video file")
    out_opts = argparse.ArgumentParser(add_help=False)
    out_opts.add_argument("--fps", type=Fraction, help="frame rate (default: the source's)")
    out_opts.add_argument("--codec", help="encoder (default by extension: libx264 for .mp4/.mkv/.mov)")
    vpull = add("pull", "cmd_video_pull", "wait for a video workload, then join its frames into OUT",
                [jobs, out_opts, stall], into=vid)
    vpull.add_argument("workload", **workload_arg)
    vpull.add_argument("output", type=Path, metavar="OUT", help="the video file to write")
    vrun = add("run", "cmd_video_run", "push IN, wait, and write the filtered video to OUT",
               [jobs, target, out_opts], into=vid)
    vrun.add_argument("input", type=Path, metavar="IN", help="the video file")
    vrun.add_argument("output", type=Path, metavar="OUT", help="the video file to write")
    vsample = add("sample", "cmd_video_sample", "write a small synthetic clip to try DPIP with", into=vid)
    vsample.add_argument("output", type=Path, metavar="OUT", help="the video file to write")
    vsample.add_argument("--seconds", type=float, default=3.0, help="length (3)")
    vsample.add_argument("--fps", type=_positive, default=12, help="frame rate (12)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        return _run(args)
    except KeyboardInterrupt:
        print("dpip: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    from cli import commands, video

    if getattr(args, "ca_file", None):
        os.environ["DPIP_CA_FILE"] = args.ca_file  # every Api of this command trusts it (cli.client)
    try:
        outcome = getattr(commands, args.run)(args)
        return asyncio.run(outcome) if inspect.iscoroutine(outcome) else outcome
    except CliError as e:
        print(f"dpip: {e}", file=sys.stderr)
        return e.code
    except EOFError:
        print("dpip: no password given", file=sys.stderr)
        return EXIT_AUTH
    except video.av.FFmpegError as e:  # before OSError: some are both
        print(f"dpip: video: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:  # a local file: unreadable input, unwritable output
        print(f"dpip: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:  # a bug of ours: still one line, unless asked for the details
        if os.environ.get("DPIP_DEBUG"):
            raise
        print(f"dpip: unexpected error: {type(e).__name__}: {e} (DPIP_DEBUG=1 shows where)", file=sys.stderr)
        return EXIT_FAILED
