"""The dashboard in real headless Chromium (Debian's chromium + chromedriver, via Selenium),
against a real server and two real workers; plus thumbnails and /metrics over real HTTP."""

from __future__ import annotations

import base64
import hashlib
import io
import re
import shutil

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.helpers import (
    ADMIN_PASSWORD,
    LocalSystem,
    png,
    push,
    ref,
    view,
    wait_completed,
    wait_until,
    workload,
)

DROP_FILES = """
const [selector, files] = arguments;
const transfer = new DataTransfer();
for (const [name, b64] of files) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  transfer.items.add(new File([bytes], name, {type: "image/png"}));
}
const zone = document.querySelector(selector);
zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true, cancelable: true}));
zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
"""


def waiting(browser: webdriver.Chrome) -> WebDriverWait:
    """Waits that look again when the page re-rendered an element between finding and reading
    it (the dashboard redraws its tables on every refresh)."""
    return WebDriverWait(browser, 60, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,))


def chromium(*extra: str) -> webdriver.Chrome:
    """Headless Chromium driven by chromedriver, with ``extra`` flags."""
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", *extra):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


def log_in(browser: webdriver.Chrome, url: str) -> None:
    """Open the dashboard at ``url`` and log in as the admin."""
    browser.get(url + "/")
    browser.find_element(By.ID, "user").clear()
    browser.find_element(By.ID, "user").send_keys("admin")
    browser.find_element(By.ID, "password").send_keys(ADMIN_PASSWORD)
    browser.find_element(By.ID, "login-button").click()


@pytest.fixture
def browser():
    driver = chromium()
    try:
        yield driver
    finally:
        driver.quit()


def test_dashboard_login_live_workers_drop_upload_and_gallery(system, browser, tmp_path):
    wait = waiting(browser)
    log_in(browser, system.url)

    # live: both workers appear as alive, with CPU and memory bars
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#workers tbody tr.alive")) == 2)
    assert browser.find_element(By.ID, "live").text == "live"
    names = {row.get_attribute("data-worker") for row in browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr")}
    assert names == {"w1", "w2"}
    assert len(browser.find_elements(By.CSS_SELECTOR, "#workers .bar.cpu")) == 2

    # drop 3 images into a new workload
    browser.find_element(By.ID, "new-name").send_keys("dropped")
    files = [(f"{i}.png", base64.b64encode(png(c)).decode()) for i, c in enumerate([(250, 0, 0), (0, 250, 0), (0, 0, 250)])]
    browser.execute_script(DROP_FILES, "#dropzone", files)
    wait.until(lambda d: "uploaded 3/3" in d.find_element(By.ID, "upload-status").text)

    # its progress reaches 100%
    row = wait.until(lambda d: next((r for r in d.find_elements(By.CSS_SELECTOR, "#workloads tbody tr")
                                     if "dropped" in r.text and "100%" in r.text), None))
    assert "completed" in row.text

    # its gallery: 3 originals beside 3 filtered thumbnails, all loaded
    row.click()
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#gallery img.filtered')].filter(i => i.complete && i.naturalWidth > 0).length") == 3)
    sizes = browser.execute_script(
        "return [...document.querySelectorAll('#gallery img')].map(i => [i.className, i.naturalWidth, i.naturalHeight])")
    assert sorted(sizes) == [["filtered", 100, 75]] * 3 + [["original", 100, 75]] * 3  # small: 100 px long side
    assert "3 filtered" in browser.find_element(By.ID, "wl-summary").text
    browser.save_screenshot(str(tmp_path / "dashboard-gallery.png"))
    browser.get(system.url + "/#/")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#workers tbody tr.alive")) == 2)
    browser.save_screenshot(str(tmp_path / "dashboard.png"))
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


def test_dashboard_runs_a_pipeline_and_says_which_step_is_wrong(system, browser):
    wait = waiting(browser)
    log_in(browser, system.url)
    options = wait.until(lambda d: [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#new-filter option")]
                         if len(d.find_elements(By.CSS_SELECTOR, "#new-filter option")) > 2 else None)
    assert {"grayscale", "blur", "resize", "crop", "sharpen"} <= set(options), "the fleet's filters, from /filters"
    # the form is filled before the login shows it (the filters load with the page): wait for the view
    pipeline = wait.until(lambda d: (field := d.find_element(By.ID, "new-pipeline")).is_displayed() and field)
    pipeline.send_keys("grayscale|resize(width=0)")
    browser.execute_script(DROP_FILES, "#dropzone", [("0.png", base64.b64encode(png((9, 99, 199))).decode())])
    wait.until(lambda d: "step 2 (resize): width must be between 1" in d.find_element(By.ID, "upload-status").text)
    pipeline.clear()
    pipeline.send_keys("resize(width=40)|grayscale")
    browser.find_element(By.ID, "new-name").send_keys("piped")
    browser.execute_script(DROP_FILES, "#dropzone", [("0.png", base64.b64encode(png((9, 99, 199))).decode())])
    wait.until(lambda d: "uploaded 1/1" in d.find_element(By.ID, "upload-status").text)
    token = ref.login(system.url, "admin", system.admin_password)
    piped = next(w for w in ref.get_json(system.url, token, "/workloads") if w["workload_name"] == "piped")
    assert piped["filter"] == "resize(width=40)|grayscale"
    done = wait_completed(system.url, token, piped["workload_id"])
    got = Image.open(io.BytesIO(ref.pull(system.url, token, piped["workload_id"], 0).body))
    assert done["filtered_images"] == [0] and got.size == (40, 30) and got.mode == "L"


def test_thumbnails_keep_aspect_and_are_cached(system):
    token = system.login()
    wid = workload(system.url, token)
    push(system, token, wid, {0: png((10, 200, 30), (1200, 800))})
    for size, expected in (("small", (100, 67)), ("medium", (300, 200)), ("large", (600, 400))):
        r = ref.request(system.url, "GET", f"/images/0?workload_id={wid}&size={size}", headers=ref.bearer(token))
        assert r.status == 200 and r.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(r.body)) as im:
            assert im.size == expected
    name = view(system.url, token, wid)["workload_name"]
    thumbs = system.data_dir / "images" / name / "thumbs"
    assert sorted(p.name for p in thumbs.iterdir()) == ["original-0-large.png", "original-0-medium.png", "original-0-small.png"]
    r = ref.request(system.url, "GET", f"/images/0?workload_id={wid}&size=huge", headers=ref.bearer(token))
    assert r.status == 400 and "size must be one of small, medium, large" in r.json()["error"]
    damaged = png((1, 2, 3), (400, 300))[:300]  # a sound header, a cut body: accepted, undecodable
    push(system, token, wid, {1: damaged})
    r = ref.request(system.url, "GET", f"/images/1?workload_id={wid}&size=small", headers=ref.bearer(token))
    assert r.status == 400 and "cannot be decoded for a thumbnail" in r.json()["error"]


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted(filter(None, (m.group(2) or "").split(",")))) == want:
            return float(m.group(3))
    raise AssertionError(f"no sample {name}{{{want}}} in /metrics")


def test_metrics_after_a_workload(make_system):
    s = make_system()
    s.start_worker("m1")
    s.start_worker("m2")
    s.wait_workers({"m1", "m2"})
    token = s.login()
    r = ref.request(s.url, "GET", "/metrics")  # open on loopback, no token
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    assert _metric(r.body.decode(), "dpip_jobs", state="done") == 0
    wid = workload(s.url, token, filter="blur")
    push(s, token, wid, {i: png((i * 20, 0, 0)) for i in range(6)})
    wait_completed(s.url, token, wid)
    text = ref.request(s.url, "GET", "/metrics").body.decode()
    assert _metric(text, "dpip_jobs", state="done") == 6
    assert _metric(text, "dpip_jobs", state="queued") == _metric(text, "dpip_jobs", state="failed") == 0
    assert _metric(text, "dpip_job_duration_seconds_count", filter="blur") == 6
    assert _metric(text, "dpip_queue_depth") == 0
    assert _metric(text, "dpip_workers_alive") == 2
    for name in ("m1", "m2"):
        assert _metric(text, "dpip_worker_alive", worker=name) == 1
        assert _metric(text, "dpip_worker_capacity", worker=name) >= 1
        assert 0 <= _metric(text, "dpip_worker_cpu_percent", worker=name) <= 100
    # The workers' own gauges (running jobs, jobs done) come with their next heartbeat after the
    # last result, not with the result: wait for that heartbeat, never assume it has come.
    def workers_settled() -> bool:
        t = ref.request(s.url, "GET", "/metrics").body.decode()
        return all(_metric(t, "dpip_worker_running_jobs", worker=n) == 0 for n in ("m1", "m2")) \
            and sum(_metric(t, "dpip_worker_jobs_done", worker=n) for n in ("m1", "m2")) == 6

    wait_until(workers_settled, 15, "the workers' heartbeats to report no running job and 6 done")
    # 6 uploads; the small results came back inside the jobs' replies, not over HTTP
    assert _metric(text, "dpip_http_requests_total", route="/images", method="POST", status="200") == 6
    assert _metric(text, "dpip_http_requests_total", route="/workloads", method="POST", status="200") == 1


def test_dashboard_deletes_a_workload_after_asking(system, browser):
    """Before login: no 'offline' badge, a hint where the password is, an icon. Then a workload
    is deleted from its page: the browser asks first (dismissed: nothing happens), then it is
    gone, from the list and from the API, its images too."""
    token = system.login()
    wid = workload(system.url, token)
    push(system, token, wid, {0: png((200, 10, 10)), 1: png((10, 200, 10))})
    wait_completed(system.url, token, wid)
    name = view(system.url, token, wid)["workload_name"]
    folder = system.data_dir / "images" / name
    assert folder.exists()

    wait = waiting(browser)
    browser.get(system.url + "/")
    assert not browser.find_element(By.ID, "live").is_displayed(), "no red 'offline' before logging in"
    assert "data/admin-password" in browser.find_element(By.ID, "login-view").text
    assert ref.request(system.url, "GET", "/favicon.ico").status == 200
    browser.find_element(By.ID, "password").send_keys(ADMIN_PASSWORD)
    browser.find_element(By.ID, "login-button").click()
    wait.until(lambda d: d.find_element(By.ID, "live").text == "live")
    browser.get(f"{system.url}/#/workloads/{wid}")
    wait.until(lambda d: name in d.find_element(By.ID, "wl-title").text)

    browser.execute_script("window.asked = 0; window.confirm = () => { window.asked += 1; return false; }")
    browser.find_element(By.ID, "wl-delete").click()  # the user says no...
    # ...which the page asked (synchronously, in the click: a "no" returns before any request),
    # so nothing can be on its way: the workload is still there.
    wait.until(lambda d: d.execute_script("return window.asked") == 1)
    assert ref.request(system.url, "GET", f"/workloads/{wid}", headers=ref.bearer(token)).status == 200
    browser.execute_script("window.confirm = () => true")  # and then yes
    browser.find_element(By.ID, "wl-delete").click()
    wait.until(lambda d: d.execute_script("return location.hash") in ("#/", ""))
    wait.until(lambda d: not any(name in r.text for r in d.find_elements(By.CSS_SELECTOR, "#workloads tbody tr")))
    assert ref.request(system.url, "GET", f"/workloads/{wid}", headers=ref.bearer(token)).status == 404
    r = ref.request(system.url, "GET", f"/images/0?workload_id={wid}", headers=ref.bearer(token))
    assert r.status == 404
    assert not folder.exists() or not any(p.is_file() for p in folder.rglob("*"))


def spki_pin(cert_pem: bytes) -> str:
    """Chromium's pin of a certificate's public key: base64 SHA-256 of its SubjectPublicKeyInfo."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def test_dashboard_over_https(tmp_path):
    """The dashboard served over HTTPS (mutual TLS on the worker plane behind it), in Chromium
    trusting the server's key by its pin (nothing else is trusted: a wrong pin shows an error
    page): login, the live worker over the event stream, a drop upload filtered."""
    system = LocalSystem(tmp_path / "data", log_dir=tmp_path / "logs", admin_password=ADMIN_PASSWORD,
                         tls_dir=tmp_path / "tls")

    pin = spki_pin((tmp_path / "tls" / "server.pem").read_bytes())
    with system:
        system.start_server()
        system.start_workers({"tw": ()})
        untrusting = chromium()
        try:  # without the pin, Chromium does not trust our CA: no dashboard, an error page
            untrusting.get(system.url + "/")
            assert not untrusting.find_elements(By.ID, "user")
        finally:
            untrusting.quit()
        driver = chromium(f"--user-data-dir={tmp_path / 'chromium'}", f"--ignore-certificate-errors-spki-list={pin}")
        try:
            wait = waiting(driver)
            assert system.url.startswith("https://")
            log_in(driver, system.url)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#workers tbody tr.alive")) == 1)
            assert driver.find_element(By.ID, "live").text == "live"
            driver.find_element(By.ID, "new-name").send_keys("over-tls")
            driver.execute_script(DROP_FILES, "#dropzone", [("0.png", base64.b64encode(png((10, 200, 90))).decode())])
            wait.until(lambda d: "uploaded 1/1" in d.find_element(By.ID, "upload-status").text)
            wait.until(lambda d: any("over-tls" in r.text and "100%" in r.text
                                     for r in d.find_elements(By.CSS_SELECTOR, "#workloads tbody tr")))
        finally:
            driver.quit()
