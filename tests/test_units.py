"""Pure functions: the wire format, placement, filters and flag parsing, with plain data."""

from __future__ import annotations

import io
import json
import time

import pytest
from PIL import Image, ImageFilter

from common.config import EnvDefaultsParser, split_host_port
from common.models import Filter, Job
from imaging.formats import sniff_format
from plane import wire
from scheduler.carrier import Carrier, DispatchStats, SchedulerSettings
from scheduler.latency import LatencyTracker
from scheduler.placement import JobView, WorkerView, place, why_not
from tests.helpers import png_bytes
from worker.filters import EncodeOptions, FilterError, process

# -- wire -----------------------------------------------------------------------------------

MESSAGES = [
    wire.Hello("w1", "ab12", "tcp://10.0.0.2:5000", welcomed_by="cd"),
    wire.Heartbeat("w1", "ab12", ["gpu"], 12.5, 40.0, wire.Gpu(1, 50.0, 25.0), 1, 2, 7,
                   draining=True, running_job_ids=[4, 5]),
    wire.Goodbye("w1", "ab12"),
    wire.Welcome("e1", "ab12", "0f", "", 8080, "", 1.0, proof="aa"),
    wire.RunJob(3, "wid", 4, "blur", 2, {"radius": 3}, capability="job.x.y", tie="ff"),
    wire.CancelJob(3),
    wire.JobResult(3, False, "boom", retryable=False, worker="w1", process_ms=1.5),
    wire.Ack(),
    wire.Exchange([wire.RunJob(3, "wid", 4, "blur", 2)], cancels=[5, 6], acks=[4]),
    wire.Results(7, [wire.JobResult(3, True, worker="w1")], stopped=[5]),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: m.TYPE)
def test_every_message_round_trips(msg):
    assert wire.decode(wire.encode(msg)) == msg


@pytest.mark.parametrize("data, words", [
    (b"\xff\xfe garbage", "not JSON"),
    (b'{"type": "heartbeat", "v": 3, "name": "w"', "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"type": "ack", "v": 99}', "protocol version"),
    (b'{"type": "ack"}', "protocol version"),
    (b'{"type": "launch_missiles", "v": 3}', "unknown message type"),
    (b'{"type": "cancel_job", "v": 3}', "missing field 'job_id'"),
    (b'{"type": "cancel_job", "v": 3, "job_id": "3"}', "expected an integer"),
    (b'{"type": "cancel_job", "v": 3, "job_id": true}', "expected an integer"),
    (b'{"type": "cancel_job", "v": 3, "job_id": -1}', "outside"),
    (b'{"type": "cancel_job", "v": 3, "job_id": 1' + b"0" * 5000 + b"}", "not JSON"),
    (b'{"type": "hello", "v": 3, "name": "a/b", "session": "ab", "rpc_address": "tcp://x:1"}', "expected form"),
    (b'{"type": "hello", "v": 3, "name": "w\\n", "session": "ab", "rpc_address": "tcp://x:1"}', "expected form"),
    (b'{"type": "heartbeat", "v": 3, "name": "w", "session": "ab", "cpu_percent": NaN}', "not JSON"),
    (b'{"type": "heartbeat", "v": 3, "name": "w", "session": "ab", "cpu_percent": 1e999}', "finite"),
    (b'{"type": "heartbeat", "v": 3, "name": "w", "session": "ab", "cpu_percent": 101}', "outside"),
    (b'{"type": "heartbeat", "v": 3, "name": "w", "session": "ab", "tags": ["x"' + b',"x"' * 40 + b"]}", "items"),
    (b"[" * 100_000, "nested deeper"),
    (b'{"a": ' * 300 + b"1" + b"}" * 300, "nested deeper"),
    (b'{"type": "run_job", "v": 3, "job_id": 1, "workload_id": "w", "image_id": 1, "filter": "x",'
     b' "attempt": 1, "params": []}', "expected an object"),
    (b"x" * (wire.MAX_MESSAGE_BYTES + 1), "exceeds"),
])
def test_decode_rejects_garbage_with_a_reason(data, words):
    with pytest.raises(wire.DecodeError, match=words):
        wire.decode(data)


def test_brackets_inside_strings_are_not_nesting():
    msg = wire.Ack(ok=False, error="[{" * 400 + '\\"' + "]}" * 100)
    assert wire.decode(wire.encode(msg)) == msg


def test_decode_ignores_unknown_fields_from_newer_peers():
    body = json.loads(wire.encode(wire.CancelJob(5)))
    body["priority"] = "high"
    assert wire.decode(json.dumps(body).encode()) == wire.CancelJob(5)


# -- placement ------------------------------------------------------------------------------

def worker(name, cpu=10.0, mem=10.0, in_flight=0, capacity=2, tags=(), gpu=0, ready=True):
    return WorkerView(name, frozenset(tags), cpu, mem, gpu, 0.0, in_flight, capacity, ready)


def test_placement_prefers_free_slots_then_idle_cpu():
    busy = worker("a", in_flight=1)
    idle = worker("b")
    assert place(JobView(), [busy, idle]) == "b"
    assert place(JobView(), [worker("a", cpu=90), worker("b", cpu=5)]) == "b"
    assert place(JobView(), [worker("a", mem=95), worker("b", mem=5)]) == "b"


def test_placement_never_exceeds_capacity_or_uses_unready_workers():
    assert place(JobView(), [worker("a", in_flight=2), worker("b", ready=False)]) is None
    assert place(JobView(), []) is None


def test_a_job_goes_ahead_only_into_a_workers_prefetch_room_and_the_least_loaded_first():
    full = [WorkerView("a", frozenset(), 10, 10, 0, 0.0, 2, 2, ahead=1),
            WorkerView("b", frozenset(), 10, 10, 0, 0.0, 3, 2, ahead=1),
            WorkerView("c", frozenset(), 10, 10, 0, 0.0, 1, 1, ahead=0)]
    assert place(JobView(), full) is None  # no free slot: nothing placed in a slot
    assert place(JobView(), full, ahead=True) == "a"  # b's room is taken, c has none
    assert place(JobView(), [*full, worker("d", in_flight=1)], ahead=True) == "d"  # a free slot still wins


def test_placement_honours_required_tags():
    job = JobView(tags=frozenset({"gpu"}))
    assert place(job, [worker("plain")]) is None
    assert place(job, [worker("plain"), worker("g", cpu=99, tags=("gpu", "x"))]) == "g"


def test_placement_goes_where_the_filters_live_and_says_which_is_missing():
    builtins = frozenset({"grayscale", "blur", "sepia"})
    plain = WorkerView("plain", frozenset(), 10, 10, 0, 0, 0, 2, filters=builtins)
    artist = WorkerView("artist", frozenset(), 90, 90, 0, 0, 1, 2, filters=builtins | {"vignette"})
    job = JobView(needs=frozenset({"vignette", "grayscale"}))
    assert place(job, [plain, artist]) == "artist", "the only one that runs every step, however busy"
    assert place(job, [plain]) is None
    assert why_not(job, [plain]) == "waiting for a live worker that runs filter vignette"
    other = WorkerView("other", frozenset(), 10, 10, 0, 0, 0, 2, filters=frozenset({"vignette"}))
    assert why_not(job, [plain, other]) == ("waiting for a live worker that runs all of grayscale, vignette"
                                            " (no one worker runs them all)")
    tagged = JobView(tags=frozenset({"x"}), needs=frozenset({"vignette"}))
    plain_x = WorkerView("px", frozenset({"x"}), 10, 10, 0, 0, 0, 2, filters=builtins)
    assert why_not(tagged, [plain_x]) == "waiting for a live worker that runs filter vignette (with tags x)"
    assert place(JobView(needs=frozenset({"anything"})), [worker("old")]) == "old", "no declaration: not filtered on"


def test_placement_prefers_a_gpu_for_the_steps_a_worker_runs_there():
    cpu = WorkerView("cpu", frozenset(), 10, 10, 0, 0, 0, 2, filters=frozenset({"sepia"}))
    gpu = WorkerView("gpu", frozenset(), 30, 30, 1, 0, 0, 2, filters=frozenset({"sepia"}),
                     gpu_filters=frozenset({"sepia"}))
    assert place(JobView(needs=frozenset({"sepia"})), [cpu, gpu]) == "gpu"
    assert place(JobView(), [cpu, gpu]) == "cpu", "a job with no GPU step goes by load"


def test_placement_avoids_workers_that_failed_the_job_unless_alone():
    job = JobView(avoid=frozenset({"a"}))
    assert place(job, [worker("a"), worker("b", cpu=90, in_flight=1)]) == "b"
    assert place(job, [worker("a")]) == "a"


def test_placement_puts_a_worker_on_probation_last_but_still_uses_it():
    slow = WorkerView("slow", frozenset(), 0.0, 0.0, 0, 0.0, 0, 2, probation=True)
    assert place(JobView(), [slow, worker("b", cpu=95, mem=95, in_flight=1)]) == "b"
    assert place(JobView(), [slow, worker("b", in_flight=2)]) == "slow", "used when the others are full"


def test_the_hedge_delay_stays_below_a_slow_workers_outliers():
    """One job in ten 2 s late fills more than 5% of the window: the p95 would be 2 s, and a
    hedge would never come before the slow copy itself; the cap at 4x the median keeps it short."""
    tracker = LatencyTracker()
    for i in range(200):
        tracker.record(1000, 2.0 if i % 10 == 0 else 0.010)
    carrier = Carrier(None, None, SchedulerSettings(hedge_floor=0.02), tracker, DispatchStats(), None)  # type: ignore[arg-type]
    job = Job(1, "w", 0, Filter.GRAYSCALE, size=1000)
    assert carrier.hedge_delay(job) == pytest.approx(0.04)
    assert Carrier(None, None, SchedulerSettings(hedge_initial=0.5), LatencyTracker(), DispatchStats(),  # type: ignore[arg-type]
                   None).hedge_delay(job) == 0.5, "a fixed delay until latencies are known"
    for _ in range(300):
        tracker.record(1000, 0.001)
    assert carrier.hedge_delay(job) == 0.02, "never sooner than the floor"


def test_placement_ties_go_to_the_first_listed():
    assert place(JobView(), [worker("b"), worker("a")]) == "b"
    assert place(JobView(), [worker("a"), worker("b")]) == "a"


# -- filters --------------------------------------------------------------------------------

def rgb_png(size=(40, 30)) -> bytes:
    im = Image.linear_gradient("L").resize(size).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def test_grayscale_keeps_size_and_png_format():
    data = rgb_png()
    out, fmt = process(data, "grayscale")
    with Image.open(io.BytesIO(out)) as im, Image.open(io.BytesIO(data)) as src:
        assert (fmt, im.format, im.size, im.mode) == ("PNG", "PNG", (40, 30), "L")
        assert im.tobytes() == src.convert("L").tobytes()


def test_grayscale_keeps_alpha():
    out, _ = process(png_bytes(8, 8, (10, 20, 30, 128), mode="RGBA"), "grayscale")
    with Image.open(io.BytesIO(out)) as im:
        assert im.mode == "LA" and im.getpixel((0, 0))[1] == 128


def test_blur_is_gaussian_radius_2_by_default_and_configurable():
    data = rgb_png()
    with Image.open(io.BytesIO(data)) as src:
        for params, radius in (({}, 2), ({"radius": 5}, 5)):
            out, _ = process(data, "blur", params)
            with Image.open(io.BytesIO(out)) as im:
                assert im.tobytes() == src.filter(ImageFilter.GaussianBlur(radius)).tobytes()


def test_png_compress_level_is_applied():
    data = rgb_png((200, 200))
    fast, _ = process(data, "blur", options=EncodeOptions(png_compress_level=1))
    small, _ = process(data, "blur", options=EncodeOptions(png_compress_level=9))
    assert len(small) < len(fast)


def test_jpeg_in_jpeg_out():
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, "JPEG")
    out, fmt = process(buf.getvalue(), "grayscale")
    assert fmt == "JPEG" and out[:3] == b"\xff\xd8\xff"


def test_filter_errors():
    with pytest.raises(FilterError, match="unknown filter"):
        process(rgb_png(), "posterize")
    with pytest.raises(FilterError, match="cannot decode"):
        process(rgb_png()[:60], "grayscale")


def test_sniff_format():
    assert sniff_format(rgb_png()[:16]) == "PNG"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WEBP"
    assert sniff_format(b"hello world12345") is None


# -- flags ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("localhost:40899", ("localhost", 40899)),
    ("10.1.2.3", ("10.1.2.3", 40899)),
    (":41000", ("h", 41000)),
    ("[::1]:5", ("::1", 5)),
    ("tcp://host:7", ("host", 7)),
])
def test_split_host_port(value, expected):
    assert split_host_port(value, "h", 40899) == expected


def test_every_flag_reads_its_dpip_variable(monkeypatch):
    monkeypatch.setenv("DPIP_CONTROLLER_PORT", "41234")
    monkeypatch.setenv("DPIP_FSYNC", "false")
    p = EnvDefaultsParser()
    p.add_argument("--controller-port", type=int, default=40899)
    p.add_argument("--no-fsync", dest="fsync", action="store_false", default=True)
    a = p.parse_args([])
    assert (a.controller_port, a.fsync) == (41234, False)
    assert p.parse_args(["--controller-port", "1"]).controller_port == 1


# -- multipart part names -------------------------------------------------------------------

def _aiohttp_part(disposition: str):
    from aiohttp import BodyPartReader
    from multidict import CIMultiDict, CIMultiDictProxy

    return BodyPartReader(b"--b", CIMultiDictProxy(CIMultiDict({"Content-Disposition": disposition})), None)  # type: ignore[arg-type]


@pytest.mark.parametrize("disposition", [
    'form-data; name="data"; filename="0.png"', 'form-data; name="workload_id"', 'FORM-DATA;name="x";',
    'form-data; name="/etc"; filename="/x.png"', 'form-data; name="a"; name="b"', "form-data; filename*=utf-8''%C3%A9.png",
    'form-data; name="a\\"b"', "form-data; name=x", "", 'form-data; name=""; filename=""', "attachment; name=\"x\"",
])
def test_part_names_agree_with_aiohttps_parser(disposition):
    """The fast path gives what aiohttp's full parser gives, and hands it what it cannot read."""
    import warnings

    from api.params import part_names

    part = _aiohttp_part(disposition)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # aiohttp warns about the malformed ones
        assert part_names(part) == (part.name, part.filename)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "1", "I;16"])
def test_the_png_header_fast_path_agrees_with_pillow(mode):
    from imaging.formats import png_header

    buf = io.BytesIO()
    Image.new(mode, (37, 5)).save(buf, "PNG")
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        expected = (im.width, im.height, im.mode)
    fast = png_header(data)
    assert fast is None or fast == expected  # None: Pillow reads it (other bit depths)
    assert fast is not None or mode not in ("L", "LA", "RGB", "RGBA"), "8-bit ones need no Pillow"
    broken = data[:20] + bytes([data[20] ^ 1]) + data[21:]  # the IHDR's CRC no longer matches
    assert png_header(broken) is None


# -- shared directory fsyncs --------------------------------------------------------------------

def test_renames_waiting_together_share_one_directory_fsync(tmp_path, monkeypatch):
    """A rename is on disk once an fsync of its directory that *began after it* has ended: the
    two that arrive while the first fsync runs share the next one, and neither returns early."""
    import threading

    from storage import files as images

    first_started, release = threading.Event(), threading.Event()
    began: list[int] = []  # how many callers had registered when each fsync began
    real_fsync = images.os.fsync
    sync = images.DirSync()

    def fsync(fd: int) -> None:
        began.append(sync._dirs[tmp_path].requested)
        if len(began) == 1:
            first_started.set()
            assert release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(images.os, "fsync", fsync)
    returned: list[str] = []
    threads = {name: threading.Thread(target=lambda n=name: (sync.sync(tmp_path), returned.append(n)))
               for name in "abc"}
    threads["a"].start()
    assert first_started.wait(10)
    threads["b"].start()
    threads["c"].start()
    deadline = time.monotonic() + 10
    while sync._dirs[tmp_path].requested < 3:  # b and c have asked, behind a's fsync
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert returned == []  # a's fsync began before b's and c's renames: it covers neither
    release.set()
    for t in threads.values():
        t.join(10)
    assert sorted(returned) == ["a", "b", "c"]
    assert began == [1, 3]  # two fsyncs for three renames; the second began after all three
    assert sync._dirs == {}  # nothing kept once nobody waits


async def test_small_downloads_are_read_whole_within_a_budget(tmp_path, monkeypatch):
    """A small image a client wants whole is read in one trip and sent from memory; a large one,
    a range, or one past the bytes held at once is streamed from its file; a missing one is 404."""
    from common.models import NotFound
    from storage import filestore as images_mod  # (the module that reads these limits)
    from storage.filestore import FileImageStore

    monkeypatch.setattr(images_mod, "SMALL_DOWNLOAD", 100)
    monkeypatch.setattr(images_mod, "READ_BUDGET", 250)  # two held at once, and room to read
    store = FileImageStore(tmp_path, tmp_path / "incoming", 10**6, 10**8)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "small").write_bytes(b"s" * 100)
    (tmp_path / "w" / "large").write_bytes(b"l" * 101)

    first = await store.download("w/small", "image/png", whole=True)
    assert first.data == b"s" * 100 and first.path is None
    assert (await store.download("w/small", "image/png")).path == tmp_path / "w" / "small", "a range: the file"
    large = await store.download("w/large", "image/png", whole=True)
    assert large.data is None and large.path == tmp_path / "w" / "large"
    second = await store.download("w/small", "image/png", whole=True)
    assert second.data is not None
    third = await store.download("w/small", "image/png", whole=True)
    assert third.data is None and third.path is not None, "past the budget: streamed"
    first.release()
    again = await store.download("w/small", "image/png", whole=True)
    assert again.data is not None, "released: room again"
    again.release()
    second.release()
    with pytest.raises(NotFound):
        await store.download("w/gone", "image/png", whole=True)
    store._remember("w/kept", b"k" * 10)  # a small original held for its job: no file read
    assert (await store.download("w/kept", "image/png", whole=True)).data == b"k" * 10
    await store.close()


def test_latency_quantiles_match_a_sort_of_the_window():
    """The tracker keeps its window sorted as latencies come and go (duplicates included): every
    quantile is what sorting the last ``window`` latencies gives."""
    import random
    from collections import deque

    rng = random.Random(7)
    tracker, window = LatencyTracker(window=50, min_samples=5), deque(maxlen=50)
    for _ in range(2000):
        v = rng.choice([rng.random(), 0.5, 0.25])
        tracker.record(70_000, v)
        window.append(v)
        ordered = sorted(window)
        for q in (0.0, 0.5, 0.95, 1.0):
            expected = ordered[min(len(ordered) - 1, int(q * len(ordered)))] if len(ordered) >= 5 else None
            assert tracker.percentile(70_000, q) == expected


# -- presigned S3 URLs (storage.presign) --------------------------------------------------------

def test_a_url_presigned_here_is_the_aws_documentations_example():
    """The example of AWS's "Authenticating Requests: Using Query Parameters" page: GET
    examplebucket/test.txt at 2013-05-24T00:00:00Z for a day."""
    import calendar

    from storage.presign import Credentials, Presigner

    url = Presigner("https://s3.amazonaws.com", "us-east-1").url(
        "GET", "examplebucket", "test.txt", 86400,
        Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
        now=calendar.timegm((2013, 5, 24, 0, 0, 0)), host="examplebucket.s3.amazonaws.com")
    assert url.startswith("https://examplebucket.s3.amazonaws.com/test.txt?")
    assert url.endswith("X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404")


@pytest.mark.parametrize("token", ["", "tok/en+=="])
@pytest.mark.parametrize("operation,method,extra", [("put_object", "PUT", {}),
                                                    ("get_object", "GET", {"ResponseContentType": "image/png"})])
def test_a_url_presigned_here_signs_what_botocore_signs(token, operation, method, extra):
    """Path-style, a key that needs encoding, a session token, a signed response header: the
    same query (in another order) and the same signature as botocore's own presigning."""
    import calendar
    from urllib.parse import parse_qs, urlsplit

    import botocore.config
    import botocore.session

    from storage.presign import Credentials, Presigner

    client = botocore.session.get_session().create_client(
        "s3", region_name="eu-west-1", endpoint_url="http://127.0.0.1:8333", aws_access_key_id="AK",
        aws_secret_access_key="SK/x+y", aws_session_token=token or None,
        config=botocore.config.Config(signature_version="s3v4", s3={"addressing_style": "path"}))
    key = "w 1/filtered/3~x+y.png"
    theirs = urlsplit(client.generate_presigned_url(operation, Params={"Bucket": "bk", "Key": key, **extra},
                                                    ExpiresIn=65))
    signed_at = parse_qs(theirs.query)["X-Amz-Date"][0]
    params = {"response-content-type": "image/png"} if extra else None
    ours = urlsplit(Presigner("http://127.0.0.1:8333", "eu-west-1").url(
        method, "bk", key, 65, Credentials("AK", "SK/x+y", token), params,
        now=calendar.timegm(time.strptime(signed_at, "%Y%m%dT%H%M%SZ"))))
    assert (ours.scheme, ours.netloc, ours.path) == (theirs.scheme, theirs.netloc, theirs.path)
    assert parse_qs(ours.query) == parse_qs(theirs.query)


def test_a_presigned_url_is_good_for_one_second_to_seven_days():
    from storage.presign import Credentials, Presigner

    signer = Presigner("http://127.0.0.1:8333", "us-east-1")
    for bad in (0, 7 * 24 * 3600 + 1):
        with pytest.raises(ValueError):
            signer.url("GET", "b", "k", bad, Credentials("a", "s"))


def test_a_tiny_job_through_built_in_filters_runs_on_the_worker_loop_within_a_small_budget():
    """worker.service._inline: a small image through built-in filters runs on the loop; a large
    one, or a pipeline over the inline budget (its first check refuses it before any work), goes
    to a filter thread with the job's own limits, where it succeeds."""
    from worker import service

    tiny = png_bytes(64, 64)
    job = wire.RunJob(1, "w", 0, "grayscale")
    assert service._inline(tiny, job)
    assert not service._inline(bytes(service.INLINE_BYTES + 1), job)
    assert not service._inline(tiny, wire.RunJob(1, "w", 0, "no-such-filter"))
    inline = service._inline_limits(service.pipeline.Limits())
    assert inline == service.INLINE_LIMITS
    out, fmt = process(tiny, "grayscale", None, EncodeOptions(), inline)
    assert Image.open(io.BytesIO(out)).mode == "L" and fmt == "PNG"
    grown = "resize(width=1000)"
    with pytest.raises(FilterError):
        process(tiny, grown, None, EncodeOptions(), inline)
    out, _ = process(tiny, grown, None, EncodeOptions(), service.pipeline.Limits())
    assert Image.open(io.BytesIO(out)).width == 1000


async def test_a_view_waits_for_the_results_being_recorded_and_no_longer(tmp_path):
    """JobLifecycle.landed: a view read of a workload waits for the results of it that this
    server is recording (a client polling for its image sees the result the worker already
    sent); not for another workload's, not for one that starts after it, and never beyond its
    bound."""
    import asyncio

    from controller.jobs import JobLifecycle
    from storage.sqlite import SqliteDatastore

    store = SqliteDatastore(tmp_path / "dpip.sqlite3")
    await store.open()
    try:
        jobs = JobLifecycle(store)
        await asyncio.wait_for(jobs.landed("w"), 1)  # nothing being recorded: at once
        release = asyncio.Event()
        steps: list[str] = []

        async def record(workload: str, name: str, until: asyncio.Event = release) -> None:
            with jobs.landing(workload):
                await until.wait()
                steps.append(name)

        first = asyncio.ensure_future(record("w", "recorded"))
        other = asyncio.ensure_future(record("v", "other workload's"))
        await asyncio.sleep(0)
        waiting = asyncio.ensure_future(jobs.landed("w"))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        release.set()
        await asyncio.wait_for(waiting, 1)
        assert "recorded" in steps
        await asyncio.gather(first, other)
        stuck = asyncio.ensure_future(record("w", "never", asyncio.Event()))
        await asyncio.sleep(0)
        t0 = time.monotonic()
        await jobs.landed("w", timeout=0.05)  # bounded: answers what is committed
        assert 0.04 < time.monotonic() - t0 < 1 and not stuck.done()
        stuck.cancel()
    finally:
        await store.close()
