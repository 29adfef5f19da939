"""The filter registry end to end: one definition that the API validates against, the worker
applies, and /filters, the OpenAPI description and dpip show."""

from __future__ import annotations

import importlib.util
import io
import json
import urllib.parse

import pytest
from PIL import Image, ImageFilter

from controller.results import result_problem
from filtering import builtins as operations
from filtering import kernels, model, pipeline, registry
from storage.images import ReceivedImage
from tests.helpers import frame_png, push, ref, wait_completed, workload
from worker.filters import FilterError, process


def test_every_parameter_is_checked_against_its_range():
    blur = registry.spec("blur")
    assert blur.validate({}) == {"radius": 2.0}
    assert blur.validate({"radius": "5", "unrelated": "x"}) == {"radius": 5.0}
    for bad, words in (("x", "must be a number"), ("-1", "between 0 and 50"), ("nan", "must be a number"),
                       ("1e999", "must be a number"), ("1_0", "must be a number"), ("\uff11\uff10", "must be a number"),
                       ("1e-320", "must be a number"), (1e-320, "must be a number"), (True, "must be a number")):
        with pytest.raises(ValueError, match=words):
            blur.validate({"radius": bad})
    assert blur.validate({"radius": "-0.0"}) == {"radius": 0.0} and str(blur.validate({"radius": -0.0})["radius"]) == "0.0"
    assert blur.validate({"radius": "2.5e1"}) == {"radius": 25.0} and blur.validate({"radius": 3}) == {"radius": 3.0}
    resize = registry.spec("resize")
    for bad in (100.5, "100.5", "\uff11\uff10\uff10", "1_00", "1e2", " 1 0 ", True):  # an integer: ASCII digits only
        with pytest.raises(ValueError, match="width must be an integer"):
            resize.validate({"width": bad})
    assert resize.validate({"width": " 100 "}) == {"width": 100}
    with pytest.raises(ValueError, match="unknown filter 'posterize'; use one of: grayscale, blur, resize"):
        registry.spec("posterize")


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
    assert [f["name"] for f in listed] == list(registry.REGISTRY)
    assert listed[1]["params"][0] == {"name": "radius", "type": "number", "default": 2.0, "minimum": 0.0,
                                      "maximum": 50.0, "help": registry.spec("blur").params[0].help}
    spec = ref.request(system.url, "GET", "/openapi.json").json()
    form = spec["paths"]["/workloads"]["post"]["requestBody"]["content"]["application/x-www-form-urlencoded"]
    assert all(f"`{name}`" in form["schema"]["properties"]["filter"]["description"] for name in registry.REGISTRY)
    assert form["schema"]["properties"]["radius"]["maximum"] == 50.0


# -- pipelines ----------------------------------------------------------------------------------

def local(steps):
    return pipeline.validate(steps, registry.REGISTRY.get, lambda: list(registry.REGISTRY))


@pytest.mark.parametrize("text, words", [
    ("resize(width=800)|posterize|grayscale", "unknown step 2 ('posterize')"),
    ("|".join(["grayscale"] * 11), "at most 10 steps, got 11"),
    ("grayscale|blur(radius=big)", "step 2 (blur): radius must be a number, got 'big'"),
    ("resize(width=0)", "step 1 (resize): width must be between 1 and 10000"),
    ("sharpen|resize(height=100000)", "step 2 (resize): height must be between 1 and 10000"),
    ("resize", "step 1 (resize): give width or height"),
    ("crop(width=10,left=3)", "step 1 (crop): give both left and top"),
    ("flip(direction=diagonal)", "step 1 (flip): direction must be one of horizontal, vertical"),
    ("blur(sigma=2)", "step 1 (blur) takes no parameter 'sigma' (radius)"),
    ("format(type=bmp)", "step 1 (format): type must be one of png, jpeg, webp"),
    ("grayscale|blur(radius=2,radius=3)", "step 2 (blur): radius given twice"),
    ("grayscale|blur(radius)", "step 2 (blur): 'radius' is not key=value"),
    ("grayscale|%%", "step 2 ('%%'): write name or name(key=value,...)"),
    ('[{"name": "grayscale"}, {"name": "rotate", "params": {"degrees": 400}}]',
     "step 2 (rotate): degrees must be between -360 and 360"),
    ('[{"name": "grayscale", "params": {"x": [1]}}]', "step 1 ('grayscale'): parameters are numbers or words"),
])
def test_every_bad_pipeline_names_its_step(text, words):
    with pytest.raises(pipeline.PipelineError) as e:
        local(pipeline.parse(text))
    assert words in str(e.value)
    assert len(str(e.value)) < 400


def test_a_pipeline_is_stored_whole_and_one_filter_as_the_course_stores_it():
    p = local(pipeline.parse(" Resize( width = 800 ) | sharpen|grayscale "))
    assert p.text() == "resize(width=800)|sharpen(radius=2.0,percent=150,threshold=3)|grayscale"
    assert p.stored() == (p.text(), {}) and p.label() == "pipeline"
    assert pipeline.of_stored(*p.stored()) == [("resize", {"width": "800"}),
                                               ("sharpen", {"radius": "2.0", "percent": "150", "threshold": "3"}),
                                               ("grayscale", {})]
    assert local(pipeline.parse("blur(radius=5)")).stored() == ("blur", {"radius": 5.0})
    assert local(pipeline.parse('[{"name": "blur", "params": {"radius": 5}}]')).stored() == ("blur", {"radius": 5.0})


def three_step(src: Image.Image) -> Image.Image:
    """resize(width=120)|sharpen|grayscale, written with Pillow directly."""
    w, h = src.size
    return (src.resize((120, round(h * 120 / w)), Image.Resampling.LANCZOS)
            .filter(ImageFilter.UnsharpMask(2.0, 150, 3)).convert("L"))


def test_a_three_step_pipeline_is_exactly_pillows_steps():
    data = frame_png(5, 300, 200)
    out, fmt = process(data, "resize(width=120)|sharpen(radius=2.0,percent=150,threshold=3)|grayscale")
    assert fmt == "PNG"
    assert Image.open(io.BytesIO(out)).tobytes() == three_step(Image.open(io.BytesIO(data))).tobytes()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "CMYK"])
@pytest.mark.parametrize("name", [n for n in registry.REGISTRY if n not in registry.COURSE])
def test_every_operation_takes_every_mode_and_its_result_passes_the_check(name, mode):
    params = {"resize": {"width": "30"}, "crop": {"width": "20", "height": "10"}, "rotate": {"degrees": "33"},
              "format": {"type": "jpeg"}}.get(name, {})
    src = Image.new("RGB", (48, 32), (10, 200, 90)).convert(mode)
    buf = io.BytesIO()
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    src.save(buf, fmt)
    text = local([(name, params)]).stored()
    out, out_fmt = process(buf.getvalue(), *text)
    got = Image.open(io.BytesIO(out))
    stored = ReceivedImage(None, got.format, len(out), got.width, got.height, got.mode, out)
    assert result_problem(text[0], (fmt, 48, 32, src.mode), stored, text[1]) is None
    assert out_fmt == ("JPEG" if name == "format" else fmt)


def test_the_result_check_follows_what_the_pipeline_declares():
    def stored(fmt, w, h, mode):
        return ReceivedImage(None, fmt, 1, w, h, mode, b"")
    original = ("PNG", 300, 200, "RGB")
    resized = "resize(width=120)|grayscale"
    assert result_problem(resized, original, stored("PNG", 120, 80, "L")) is None
    assert "not grayscale" in result_problem(resized, original, stored("PNG", 120, 80, "RGB"))
    assert "a JPEG result" in result_problem(resized, original, stored("JPEG", 120, 80, "L"))
    webp = "format(type=webp,quality=80)"
    assert result_problem(webp, original, stored("WEBP", 300, 200, "RGB")) is None
    assert "the pipeline makes WEBP" in result_problem(webp, original, stored("PNG", 300, 200, "RGB"))
    assert "120x80 result" in result_problem("sharpen", original, stored("PNG", 120, 80, "RGB"))
    assert result_problem("grayscale|sepia", original, stored("PNG", 300, 200, "RGB")) is None


def test_sepia_is_an_array_kernel_with_one_code_path_for_numpy_and_cupy():
    import numpy
    spec = registry.spec("sepia")
    assert spec.gpu and kernels.array_module(False) is numpy
    if importlib.util.find_spec("cupy") is None:
        assert kernels.array_module(True) is numpy, "no CuPy: NumPy, whatever the GPU"
    im = Image.new("RGB", (4, 3), (100, 50, 200))
    r, g, b = 100, 50, 200
    want = tuple(min(255, round(a * r + bb * g + c * b)) for a, bb, c in operations.SEPIA)
    assert kernels.run_kernel(spec.kernel, im, {"strength": 1.0}, xp=numpy).getpixel((1, 1)) == want
    assert kernels.run_kernel(spec.kernel, im, {"strength": 0.0}, xp=numpy).tobytes() == im.tobytes()


def test_a_declaration_from_a_worker_is_checked_like_a_plugin():
    from plane import declarations, wire
    for spec in registry.REGISTRY.values():
        back = declarations.read(wire.decode(wire.encode(wire.Joined([declarations.declaration_of(spec)]))).filters[0])
        assert back.describe() == {**spec.describe(), "gpu": False, "builtin": False}
        assert back.apply is None
    bad = wire.FilterDeclaration("Bad-Name")
    with pytest.raises(ValueError):
        declarations.read(bad)
    with pytest.raises(ValueError):
        declarations.read(wire.FilterDeclaration("x", params=[wire.ParamDeclaration("p", "number", "", 5.0, 1.0)]))


# -- through a real system ------------------------------------------------------------------------

def test_pipelines_end_to_end_in_every_form_exact_pixels(system):
    token = ref.login(system.url, "admin", system.admin_password)
    form = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-www-form-urlencoded"}
    text = "resize(width=120)|sharpen|grayscale"
    json_steps = [{"name": "resize", "params": {"width": 120}}, {"name": "sharpen"}, {"name": "grayscale"}]
    made = [ref.request(system.url, "POST", "/workloads", f"filter={text}".encode(), form),
            ref.request(system.url, "POST", "/workloads?filter=" + urllib.parse.quote(text), None,
                        {"Authorization": f"Bearer {token}"}),
            ref.request(system.url, "POST", "/workloads", json.dumps({"filter": json_steps}).encode(),
                        {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})]
    frames = {i: frame_png(i, 300, 200) for i in range(3)}
    for r in made:
        assert r.status == 200, r.body
        body = r.json()
        assert body["filter"] == "resize(width=120)|sharpen(radius=2.0,percent=150,threshold=3)|grayscale"
        assert [s["name"] for s in body["steps"]] == ["resize", "sharpen", "grayscale"]
        push(system, token, body["workload_id"], frames)
    for r in made:
        wid = r.json()["workload_id"]
        assert wait_completed(system.url, token, wid)["filtered_images"] == [0, 1, 2]
        for i, data in frames.items():
            got = Image.open(io.BytesIO(ref.pull(system.url, token, wid, i).body))
            assert got.size == (120, 80) and got.tobytes() == three_step(Image.open(io.BytesIO(data))).tobytes()


def test_a_format_step_changes_the_results_format_on_purpose(system):
    token = ref.login(system.url, "admin", system.admin_password)
    wid = workload(system.url, token, filter="crop(width=50,height=40)|format(type=webp,quality=80)")
    push(system, token, wid, {0: frame_png(1, 100, 80)})
    wait_completed(system.url, token, wid)
    r = ref.pull(system.url, token, wid, 0)
    assert r.status == 200 and r.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(r.body)).size == (50, 40)


def test_bad_pipelines_are_400_naming_the_step_and_create_nothing(system):
    token = ref.login(system.url, "admin", system.admin_password)
    form = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-www-form-urlencoded"}
    before = len(ref.get_json(system.url, token, "/workloads"))
    for body, words in ((b"filter=grayscale|posterize", "unknown step 2 ('posterize')"),
                        ("filter=" + "|".join(["blur"] * 11), "at most 10 steps"),
                        (b"filter=resize(width=0)", "step 1 (resize): width must be between 1 and 10000"),
                        (b"filter=resize(width=100000)", "step 1 (resize): width must be between 1 and 10000"),
                        (b"filter=blur|grayscale&radius=3", "give each step's parameters inside it"),
                        (b"filter=resize(width=800)&width=900", "not width beside the filter"),
                        (b"filter=grayscale|crop&left=4", "not left beside the filter")):
        r = ref.request(system.url, "POST", "/workloads", body if isinstance(body, bytes) else body.encode(), form)
        assert r.status == 400 and words in r.json()["error"], r.body
    assert len(ref.get_json(system.url, token, "/workloads")) == before
    listed = [f["name"] for f in ref.request(system.url, "GET", "/filters").json()]
    assert {"resize", "crop", "rotate", "sharpen", "grayscale", "blur"} <= set(listed)


def test_a_plugins_bug_fails_its_job_for_good_with_a_reason(monkeypatch):
    def buggy(im, params):
        return {"not": "an image"}[params["missing"]]
    monkeypatch.setitem(registry.REGISTRY, "buggy", model.define("buggy", "raises")(buggy))
    monkeypatch.setitem(registry.REGISTRY, "liar", model.define("liar", "no image")(lambda im, p: "text"))
    data = frame_png(0, 20, 20)
    with pytest.raises(FilterError, match=r"step 2 \(buggy\) failed: KeyError: 'missing'"):
        process(data, "grayscale|buggy")
    with pytest.raises(FilterError, match="liar returned str, not an image"):
        process(data, "liar")


def test_a_pipeline_too_long_to_send_is_refused_before_anything_is_created():
    long = [model.Param(f"p{i}_{'x' * 28}", int, 10**9, 0, 10**9, "") for i in range(16)]
    spec = model.define("wide", "many parameters", *long)(lambda im, p: im)
    with pytest.raises(pipeline.PipelineError, match="longer than 1024 characters"):
        pipeline.validate([("wide", {})] * 2, {"wide": spec}.get, list)
    assert pipeline.validate([("wide", {})], {"wide": spec}.get, list).stored()[0] == "wide", "one step: name + params"


def test_a_workers_declaration_fits_its_welcome_answer(monkeypatch):
    from plane import declarations, wire
    huge = [model.Param(f"p{i}", float, 1.0, 0.0, 2.0, "h" * 200) for i in range(16)]
    for i in range(200):
        monkeypatch.setitem(registry.REGISTRY, f"plug{i}", model.define(f"plug{i}", "x" * 200, *huge)(lambda im, p: im))
    declared = declarations.of_registry()
    assert 0 < len(declared) <= wire.MAX_FILTERS and declared[0].name == "grayscale", "built-ins first"
    assert len(wire.encode(wire.Joined(declared))) <= declarations.MAX_DECLARATION_BYTES


def test_a_plugins_result_is_judged_by_its_own_workers_declaration():
    keeps = model.define("vignette", "x")(lambda im, p: im)
    shrinks = model.define("vignette", "x", size="changes")(lambda im, p: im)
    original, small = ("PNG", 300, 200, "RGB"), ReceivedImage(None, "PNG", 1, 30, 20, "RGB", b"")
    assert "30x20 result" in result_problem("vignette", original, small, {}, {"vignette": keeps})
    assert result_problem("vignette", original, small, {}, {"vignette": shrinks}) is None
    assert result_problem("vignette", original, small, {}, None) is None, "undeclared: only the format is known"
    assert "a JPEG result" in result_problem("vignette", original, ReceivedImage(None, "JPEG", 1, 30, 20, "RGB", b""))
