"""The filter registry end to end: one definition that the API validates against, the worker
applies, and /filters, the OpenAPI description and dpip show."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageFilter

from common import filters
from tests.helpers import frame_png, push, ref, wait_completed


def test_every_parameter_is_checked_against_its_range():
    blur = filters.spec("blur")
    assert blur.validate({}) == {"radius": 2.0}
    assert blur.validate({"radius": "5", "unrelated": "x"}) == {"radius": 5.0}
    for bad, words in (("x", "must be a number"), ("-1", "between 0 and 50"), ("nan", "between"),
                       ("1e999", "between")):
        with pytest.raises(ValueError, match=words):
            blur.validate({"radius": bad})
    with pytest.raises(ValueError, match="unknown filter 'sepia'; use one of: grayscale, blur"):
        filters.spec("sepia")


def test_blur_radius_end_to_end_and_bad_parameters_are_400(system):
    token = ref.login(system.url, "admin", system.admin_password)
    form = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-www-form-urlencoded"}
    for body, words in ((b"filter=blur&radius=500", "between 0 and 50"), (b"filter=blur&radius=big", "number"),
                        (b"filter=grayscale&radius=5", "takes no parameter 'radius'")):
        r = ref.request(system.url, "POST", "/workloads", body, form)
        assert r.status == 400 and words in r.json()["error"], r.body
    r = ref.request(system.url, "POST", "/workloads", b"filter=blur&radius=5", form)  # curl -d filter=blur -d radius=5
    assert r.status == 200 and r.json()["params"] == {"radius": 5.0}
    wid = r.json()["workload_id"]
    frames = {0: frame_png(3, 60, 40)}
    push(system, token, wid, frames)
    wait_completed(system.url, token, wid)
    got = Image.open(io.BytesIO(ref.pull(system.url, token, wid, 0).body))
    src = Image.open(io.BytesIO(frames[0]))
    assert got.tobytes() == src.filter(ImageFilter.GaussianBlur(5.0)).tobytes()
    assert got.tobytes() != src.filter(ImageFilter.GaussianBlur(2.0)).tobytes(), "the default radius"


def test_the_registry_is_what_clients_see(system):
    listed = ref.request(system.url, "GET", "/filters").json()  # public, like /openapi.json
    assert [f["name"] for f in listed] == list(filters.REGISTRY)
    assert listed[1]["params"][0] == {"name": "radius", "type": "number", "default": 2.0, "minimum": 0.0,
                                      "maximum": 50.0, "help": filters.spec("blur").params[0].help}
    spec = ref.request(system.url, "GET", "/openapi.json").json()
    form = spec["paths"]["/workloads"]["post"]["requestBody"]["content"]["application/x-www-form-urlencoded"]
    assert form["schema"]["properties"]["filter"]["enum"] == list(filters.REGISTRY)
    assert form["schema"]["properties"]["radius"]["maximum"] == 50.0
