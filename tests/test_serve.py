"""satkit.serve: the JSON endpoint (every bad input, the concurrent load, image modes), the model's batching,
the stop signals, the paper-style overlay, and the page in a real headless chromium (tools/browser.py).

Everything listens on 127.0.0.1 on a free port, with the tiny untrained checkpoints of test_caption.py.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from test_caption import GRID, SIZE, make_checkpoint, shapes_image

import caption
from satkit import figures, serve
from satkit.captioner import Captioner
from satkit.decoding import DecodeOptions
from tools import browser

ROOT = Path(__file__).resolve().parent.parent
UPLOAD_CAP = 200_000  # bytes: the test server's size cap
OPTS = {"beam_size": "3", "max_len": "6"}  # small work per request


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """Untrained; <end> allowed, so captions differ in length."""
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny.pt", end_bias=0.0)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("serve_photos")
    paths = []
    for i in range(8):
        shapes_image(seed=10 + i).save(folder / f"photo{i}.png")
        paths.append(folder / f"photo{i}.png")
    return paths


@pytest.fixture(scope="module")
def captioner(ckpt) -> Captioner:
    return Captioner.from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def server(ckpt, photos):
    """The server in this process, on a free port of 127.0.0.1."""
    srv = serve.make_server(ckpt, port=0, quiet=True, examples=[str(photos[0])], max_upload_bytes=UPLOAD_CAP)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    srv.worker.close()


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[str, bytes]:
    boundary = uuid.uuid4().hex
    chunks = []
    for name, value in fields.items():
        chunks += [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()]
    for name, (filename, data) in files.items():
        chunks += [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                   f"Content-Type: application/octet-stream\r\n\r\n".encode(), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(chunks)


def request(srv: serve.CaptionServer, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def post_caption(srv: serve.CaptionServer, fields: dict[str, str], image: bytes | None = None,
                 filename: str = "photo.png") -> tuple[int, dict[str, Any]]:
    content_type, body = multipart(fields, {"image": (filename, image)} if image is not None else {})
    status, _, data = request(srv, "POST", "/api/caption", body, {"Content-Type": content_type})
    return status, json.loads(data)


def assert_one_line_error(status: int, answer: dict[str, Any], expected_status: int, text: str) -> None:
    assert status == expected_status, answer
    assert set(answer) == {"error"} and "\n" not in answer["error"] and text in answer["error"], answer


def alive(srv: serve.CaptionServer) -> bool:
    status, _, data = request(srv, "GET", "/api/health")
    return status == 200 and json.loads(data)["ok"] is True


# --------------------------------------------------------------------------------------------
# The endpoint
# --------------------------------------------------------------------------------------------
def test_page_health_and_examples(server, photos):
    status, headers, page = request(server, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert b"http://" not in page and b"https://" not in page and b"//cdn" not in page  # nothing from outside
    status, _, data = request(server, "GET", "/api/health")
    health = json.loads(data)
    assert status == 200 and health["ok"] is True
    assert health["model"]["grid"] == GRID and health["model"]["image_size"] == SIZE
    assert health["limits"]["max_upload_bytes"] == UPLOAD_CAP
    assert health["defaults"]["beam_size"] == DecodeOptions().beam_size  # DecodeOptions' defaults, not a copy
    examples = json.loads(request(server, "GET", "/api/examples")[2])["examples"]
    assert [e["name"] for e in examples] == [photos[0].name]
    assert request(server, "GET", examples[0]["url"])[2] == photos[0].read_bytes()
    status, _, data = request(server, "GET", "/examples/7")
    assert status == 404 and "error" in json.loads(data)


def test_caption_answer_is_the_captioners(server, captioner, photos):
    """The JSON holds what Captioner gives for the same photo and options (one decode path), with the
    alphas, betas, measures and the two renderings' maps."""
    status, answer = post_caption(server, {**OPTS, "n_best": "2", "overlays": "1"}, photos[1].read_bytes())
    assert status == 200, answer
    expected = captioner(photos[1], beam_size=3, n_best=2, max_len=6)[0]
    assert [c["caption"] for c in answer["captions"]] == [c.text for c in expected.captions]
    assert [c["score"] for c in answer["captions"]] == pytest.approx([c.score for c in expected.captions], abs=1e-4)
    assert answer["grid"] == GRID and answer["seconds"] > 0 and answer["decode"]["beam_size"] == 3
    for got, want in zip(answer["captions"], expected.captions):
        alphas = np.array(got["alphas"])
        assert alphas.shape == (len(want.words), GRID, GRID) and got["words"] == want.words
        np.testing.assert_allclose(alphas, want.alphas.numpy(), atol=1e-4)
        np.testing.assert_allclose(alphas.sum(axis=(1, 2)), 1.0, atol=1e-3)
        assert len(got["betas"]) == len(want.words)
        assert [m["x_uniform"] for m in got["measures"]] == pytest.approx(
            [float(a.max()) * GRID * GRID for a in want.alphas], abs=1e-3)
        for style in ("paper", "highlight"):
            maps = Image.open(io.BytesIO(base64.b64decode(got["maps"][style].split(",", 1)[1])))
            side = maps.size[0]
            assert maps.mode == "L" and maps.size == (side, side * len(want.words))
    image = Image.open(io.BytesIO(base64.b64decode(answer["image"].split(",", 1)[1])))
    assert image.size == (SIZE, SIZE)


def _png_bomb(side: int = 30_000) -> bytes:
    """A PNG whose header claims side x side pixels (over 2x PIL's limit): refused before any pixel is read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    shapes_image(seed=1).resize((200, 200)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


@pytest.mark.parametrize("upload, status, text", [
    (b"this is a text file, not a photo\n", 400, "not an image file"),
    (b"", 400, "empty file"),
    (_truncated_jpeg(), 400, "truncated"),
    (_png_bomb(), 400, "decompression-bomb"),
    (b"\0" * (UPLOAD_CAP + 1000), 413, f"limit of {UPLOAD_CAP} bytes"),
    (None, 400, "missing field `image`"),
], ids=["not-an-image", "zero-bytes", "truncated-jpeg", "decompression-bomb", "over-the-cap", "missing-field"])
def test_bad_uploads_are_one_line_4xx_and_the_server_goes_on(server, upload, status, text):
    got, answer = post_caption(server, OPTS, upload, filename="upload.jpg")
    assert_one_line_error(got, answer, status, text)
    assert alive(server)


def test_bodies_that_are_not_a_form(server):
    status, _, data = request(server, "POST", "/api/caption", b'{"image": 1}', {"Content-Type": "application/json"})
    assert_one_line_error(status, json.loads(data), 400, "multipart/form-data")
    content_type, body = multipart(OPTS, {"image": ("a.png", b"x")})
    status, _, data = request(server, "POST", "/api/caption", body[:-20], {"Content-Type": content_type})
    assert_one_line_error(status, json.loads(data), 400, "cut short")
    status, _, data = request(server, "POST", "/api/nothing", body, {"Content-Type": content_type})
    assert status == 404 and "error" in json.loads(data)
    assert alive(server)


@pytest.mark.parametrize("fields, text", [
    ({"beam_size": "abc"}, "beam_size='abc' is not an integer"),
    ({"beam_size": "0"}, "beam_size=0 must be >= 1"),
    ({"beam_size": "11"}, "beam_size=11 must be <= 10"),
    ({"max_len": "100000"}, "max_len=100000 must be <="),
    ({"top_p": "1.5"}, "top_p=1.5 must be <= 1.0"),
    ({"temperature": "0"}, "temperature=0.0 must be > 0.0"),
    ({"length_penalty": "nan"}, "length_penalty=nan must be a finite number"),
    ({"sample": "maybe"}, "sample='maybe' is not a yes/no value"),
    ({"hard_decode": "bogus"}, "hard_decode='bogus' is not one of"),
    ({"beam_size": "2", "n_best": "3"}, "n_best=3 must be in 1..beam_size (2)"),
    ({"colour": "red"}, "unknown field colour"),
])
def test_bad_option_values_are_422_naming_the_field(server, photos, fields, text):
    status, answer = post_caption(server, fields, photos[0].read_bytes())
    assert_one_line_error(status, answer, 422, text)


def _mode_image(mode: str) -> tuple[bytes, str]:
    rgb = shapes_image(seed=5)
    buffer = io.BytesIO()
    if mode == "I;16":
        grey = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
        Image.fromarray(grey).save(buffer, format="PNG")  # uint16: mode I;16
    elif mode == "CMYK":
        rgb.convert("CMYK").save(buffer, format="JPEG", quality=95)
    elif mode == "P":
        rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(buffer, format="PNG")
    else:  # RGBA: half transparent
        rgba = rgb.convert("RGBA")
        rgba.putalpha(128)
        rgba.save(buffer, format="PNG")
    return buffer.getvalue(), "photo.jpg" if mode == "CMYK" else "photo.png"


@pytest.mark.parametrize("mode", ["I;16", "CMYK", "P", "RGBA"])
def test_image_modes_caption_as_caption_py_does(server, captioner, tmp_path, mode):
    data, name = _mode_image(mode)
    path = tmp_path / name
    path.write_bytes(data)
    assert Image.open(path).mode == mode
    status, answer = post_caption(server, OPTS, data, filename=name)
    assert status == 200, answer
    expected = captioner(path, beam_size=3, max_len=6)[0].best
    assert answer["captions"][0]["caption"] == expected.text
    np.testing.assert_allclose(np.array(answer["captions"][0]["alphas"]), expected.alphas.numpy(), atol=1e-4)


def test_sixteen_clients_four_photos_each_none_lost(server, captioner, photos):
    """64 requests, 16 at a time: every one answered, each with its own photo's caption (batching mixes
    no answers up), within a bounded time."""
    expected = {p.name: r.best.text for p, r in zip(photos, captioner(photos, beam_size=3, max_len=6))}
    uploads = {p.name: p.read_bytes() for p in photos}

    def client(i: int) -> list[tuple[str, int, dict[str, Any]]]:
        names = [photos[(i + k) % len(photos)].name for k in range(4)]
        return [(name, *post_caption(server, OPTS, uploads[name], filename=name)) for name in names]

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        answers = [a for result in pool.map(client, range(16)) for a in result]
    elapsed = time.monotonic() - started
    assert len(answers) == 64 and all(status == 200 for _, status, _ in answers), answers
    assert all(answer["captions"][0]["caption"] == expected[name] for name, _, answer in answers)
    assert elapsed < 60, elapsed
    assert alive(server)


class _Held:
    """A stand-in Captioner whose first batch waits until released, to see how the next ones are grouped."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.batches: list[list[str]] = []

    def caption_loaded(self, loaded, opts, n_best):
        self.batches.append([source for source, _, _ in loaded])
        if len(self.batches) == 1:
            self.release.wait(10)
        return [f"{source} beam {opts.beam_size}" for source, _, _ in loaded]


def test_worker_batches_waiting_requests_with_the_same_options():
    held = _Held()
    worker = serve.BatchWorker(held, max_batch=2, max_pending=4)
    one, three = DecodeOptions(beam_size=1), DecodeOptions(beam_size=3)
    first = worker.submit(("a", None, None), one, 1)
    deadline = time.monotonic() + 5
    while not held.batches and time.monotonic() < deadline:
        time.sleep(0.01)
    waiting = [worker.submit((name, None, None), opts, 1) for name, opts in
               [("b", one), ("c", three), ("d", one), ("e", one)]]
    with pytest.raises(serve.HttpError) as busy:  # max_pending requests wait already
        worker.submit(("f", None, None), one, 1)
    assert busy.value.status == 503
    held.release.set()
    assert [f.result(10)[0] for f in [first, *waiting]] == ["a beam 1", "b beam 1", "c beam 3", "d beam 1", "e beam 1"]
    worker.close()
    # The oldest waiting request leads; the others with its options join it, up to max_batch.
    assert held.batches == [["a"], ["b", "d"], ["c"], ["e"]]


# --------------------------------------------------------------------------------------------
# Start and stop
# --------------------------------------------------------------------------------------------
def test_missing_default_checkpoint_is_one_line_naming_the_make_targets(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert serve.main(["--port", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "make flickr8k" in err and "make demo" in err and serve.DEFAULT_CHECKPOINT in err


def _read_line(stream, timeout: float) -> str:
    """One line of a child's stdout, or '' after timeout seconds."""
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline().decode() if ready else ""


def _stop_with_a_request_in_flight(port: int, photo: Path, stop: Any) -> dict[str, Any]:
    """Send the headers and half the body of a caption request, call stop() (a signal), wait until new
    connections are refused, send the rest: the answer to the request that was in flight."""
    content_type, body = multipart(OPTS, {"image": ("p.png", photo.read_bytes())})
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(f"POST /api/caption HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
        time.sleep(0.5)  # accepted: the server polls for connections every 0.1 s
        stop()
        deadline = time.monotonic() + 60
        while True:  # new connections are refused once the listening socket closes
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except (ConnectionRefusedError, ConnectionResetError):  # reset: the socket closed mid-handshake
                break
            assert time.monotonic() < deadline, "still accepting connections a minute after the signal"
            time.sleep(0.05)
        sock.sendall(body[len(body) // 2 :])
        answer = b""
        while chunk := sock.recv(1 << 16):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"200", answer[:300]
    return json.loads(payload)


def test_sigint_refuses_new_requests_and_finishes_the_one_in_flight(ckpt, photos):
    """serve_until_stopped in this process's main thread, Ctrl-C's signal from another thread."""
    srv = serve.make_server(ckpt, port=0, quiet=True)
    before = signal.getsignal(signal.SIGINT)
    answers = []
    client = threading.Thread(target=lambda: answers.append(_stop_with_a_request_in_flight(
        srv.server_address[1], photos[0], lambda: os.kill(os.getpid(), signal.SIGINT))))
    client.start()
    assert serve.serve_until_stopped(srv) == 0
    client.join(60)
    assert answers and answers[0]["captions"][0]["caption"]
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back


@pytest.mark.slow
def test_sigterm_stops_the_command_cleanly_with_exit_code_0(ckpt, photos):
    child = subprocess.Popen([sys.executable, "-m", "satkit.serve", "--checkpoint", str(ckpt), "--port", "0",
                              "--quiet"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = _read_line(child.stdout, 180)  # seconds on a quiet 2-core machine; a minute on a loaded one
        assert " on http://127.0.0.1:" in line, (line, child.stderr.read1().decode() if child.poll() is not None else "")
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        answer = _stop_with_a_request_in_flight(port, photos[0], lambda: child.send_signal(signal.SIGTERM))
        assert answer["captions"][0]["caption"]
        assert child.wait(timeout=120) == 0
        assert "stopping" in child.stderr.read().decode()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# --------------------------------------------------------------------------------------------
# The paper's rendering, shared by caption.py and the page
# --------------------------------------------------------------------------------------------
def test_paper_overlay_is_a_white_veil_where_alpha_is_high():
    image = np.full((4, 4, 3), 100, dtype=np.uint8)
    weight = np.zeros((4, 4))
    weight[0, 0] = 1.0
    out = figures.paper_overlay(image, weight)
    assert out[0, 0].tolist() == [round(0.2 * 100 + 0.8 * 255)] * 3  # 0.8 opacity of white
    assert out[3, 3].tolist() == [round(0.2 * 100)] * 3  # 0.8 opacity of black


def test_attention_measures():
    flat = figures.attention_measures(np.full((7, 7), 1 / 49))
    assert flat["x_uniform"] == pytest.approx(1.0) and flat["entropy"] == pytest.approx(1.0)
    one = np.zeros((7, 7))
    one[3, 3] = 1.0
    peaked = figures.attention_measures(one)
    assert peaked == {"peak": 1.0, "x_uniform": 49.0, "entropy": 0.0, "half_mass_area": pytest.approx(1 / 49)}


def test_caption_py_overlay_paper(ckpt, photos, tmp_path, capsys):
    assert caption.main(["--img", str(photos[0]), "--checkpoint", str(ckpt), "--max-len", "3", "--beam-size", "2",
                         "--overlay", "paper", "--out-dir", str(tmp_path), "--device", "cpu"]) == 0
    grid = Image.open(tmp_path / f"{photos[0].stem}_attention.png")
    assert grid.size[0] > 0
    alphas = torch.softmax(torch.randn(2, GRID, GRID).flatten(1), 1).view(2, GRID, GRID)
    panels = figures.render_panels(figures.AttentionMaps(shapes_image(seed=0), ["a", "b"], alphas), overlay="paper")
    highlight = figures.render_panels(figures.AttentionMaps(shapes_image(seed=0), ["a", "b"], alphas))
    assert len(panels) == 3 and np.asarray(panels[1]).tolist() != np.asarray(highlight[1]).tolist()


# --------------------------------------------------------------------------------------------
# The page in a real browser
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(browser.find_chromium() is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_page_in_headless_chromium(server, photos, tmp_path):
    """Upload a photo, wait for the caption, click the third word: both renderings change, the word and
    its measures show; the page asks nothing of any other host. The screenshot is docs/serve.png's kind."""
    shot = tmp_path / "serve.png"
    run = browser.caption_in_page(server.url, photos[2], shot, word=3, timeout_s=60)
    assert run.captions and all(run.captions) and "captioned in" in run.status
    assert len(run.words) >= 3 and run.selected == run.words[2] and run.measures.startswith(f"3: {run.words[2]}")
    for canvas in ("paper", "highlight"):
        assert run.overlay_before[canvas] != run.overlay_after[canvas], canvas
    assert run.requests and all(url.startswith(server.url) for url in run.requests), run.requests
    with Image.open(shot) as image:
        assert image.size == browser.WINDOW
