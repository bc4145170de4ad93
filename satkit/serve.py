"""Caption your own photo in a browser: a local page and a JSON endpoint over one loaded Captioner.

    python -m satkit.serve --checkpoint runs/flickr8k_lite/best.pt --port 8000     # or: make serve
    curl -F image=@photo.jpg -F beam_size=5 -F n_best=3 http://127.0.0.1:8000/api/caption

    GET  /                the page (satkit/serve_page.html: no asset, font or script from outside)
    GET  /api/health      {"ok": true, "model": {...}, "limits": {...}, "defaults": {...}}
    POST /api/caption     multipart: `image` and optional decoding fields (FORM_FIELDS) -> the captions as JSON
    GET  /api/examples    the example photos given with --examples; GET /examples/N serves one

Why the standard library's ThreadingHTTPServer and no web framework: docs/api.md measures the choice.
One thread owns the model and decodes, through Captioner.caption_loaded (decoding.decode_images, the one
decode path), every request waiting with the same options as one batch; each request's own thread reads
the upload in memory (it is never written to disk), decodes the image as caption.py does
(Captioner.load_bytes) and renders the answer. Every bad input is answered with a 4xx status and
{"error": "one line"}; SIGINT and SIGTERM stop accepting, finish the requests in flight and exit 0.
"""
from __future__ import annotations

import argparse
import base64
import email.message
import faulthandler
import io
import json
import mimetypes
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, fields, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from satkit.captioner import Captioner, CaptionResult, collect_images
from satkit.decoding import DecodeOptions
from satkit.figures import GIF_FRAME_MS, HIGHLIGHT_FLOOR, PAPER_VEIL, attention_measures, overlay_weights
from satkit.infra.runtime import UserError, one_line, run_cli
from satkit.plugins import import_args_parser
from satkit.validation import check_fields

__all__ = ["CaptionServer", "BatchWorker", "FORM_FIELDS", "make_server", "parse_multipart", "request_options",
           "serve_until_stopped", "main"]

DEFAULT_CHECKPOINT = "runs/flickr8k_lite/best.pt"  # what `make flickr8k` writes
DEFAULT_PORT = 8000
MAX_UPLOAD_BYTES = 16 * 1024 * 1024  # a whole request body; a phone photo is 2-8 MB
MAX_BEAM = 10  # beam_size (and so n_best) a request may ask: a beam's cost grows with it
MAX_LEN_LIMIT = 100  # max_len a request may ask
MAX_BATCH = 16  # requests decoded together
MAX_PENDING = 64  # requests waiting for the model; more are refused (503), so memory stays bounded
DECODE_SLOTS = 2  # uploads turned into pixels at once: a large photo's pixels take hundreds of MB
MAP_CELL_PX = 8  # the smoothed maps sent to the page have 8 px a grid cell (the browser scales them up):
# smoothing at the photo's 224 px took ~25 ms a map (50 ms in the paper's wider style) on the 2-core CPU
IMAGE_SIZE_SHOWN = 256  # the photo sent back to the page is at most this many px a side
ALPHA_DIGITS = 4  # alphas are rounded to this many decimals in the JSON
MAX_EXAMPLES = 12
REQUEST_TIMEOUT_S = 30  # a client that sends nothing for this long is dropped (it cannot hold a thread)
DRAIN_BYTES = 64 * 1024 * 1024  # an oversized upload is read (and dropped) up to this much, so the client sees the 413
OVERLAYS = ("paper", "highlight")  # the renderings the page shows (satkit.figures.OVERLAY_STYLES)

_DEFAULTS = DecodeOptions()
# The decoding controls a request may set: DecodeOptions' own fields (with its defaults and bounds) but its
# batch size, which is the server's, plus n_best and `overlays` (1: also send the maps the page draws).
FORM_FIELDS = tuple(f.name for f in fields(DecodeOptions) if f.name != "batch_size") + ("n_best", "overlays")
_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no", "")


class HttpError(Exception):
    """A request the server refuses: its HTTP status and one line naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------------
# Requests: multipart form -> fields -> decoding options
# --------------------------------------------------------------------------------------------
@dataclass
class Part:
    """One field of a multipart form."""

    filename: str | None  # set for a file field
    data: bytes


def _header_params(value: str, header: str) -> email.message.Message:
    """A header's value parsed as MIME parameters (`form-data; name="image"`), the way the email package does."""
    message = email.message.Message()
    message[header] = value
    return message


def parse_multipart(content_type: str, body: bytes) -> dict[str, Part]:
    """A multipart/form-data body -> {field name: Part}; HttpError 400 when it is not one or is malformed.

    Written here (bytes.find over the body, one copy of each part) rather than through the email package,
    which took 0.73 s for a 10 MB upload against milliseconds, holding the GIL meanwhile.
    """
    header = _header_params(content_type, "content-type")
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str) or not boundary:
        raise HttpError(400, f"expected a multipart/form-data body with the field `image`, got {content_type!r}")
    delimiter = b"--" + boundary.encode("latin-1")
    pos = body.find(delimiter)
    if pos < 0:
        raise HttpError(400, "malformed multipart body: no boundary")
    pos += len(delimiter)
    parts: dict[str, Part] = {}
    while not body.startswith(b"--", pos):  # `--boundary--` closes the body
        if not body.startswith(b"\r\n", pos):
            raise HttpError(400, "malformed multipart body: a boundary not followed by a line break")
        end = body.find(b"\r\n" + delimiter, pos + 2)
        head_end = body.find(b"\r\n\r\n", pos, end)
        if end < 0 or head_end < 0:
            raise HttpError(400, "malformed multipart body: cut short before its closing boundary")
        head = body[pos + 2 : head_end].decode("utf-8", errors="replace")
        headers = dict(line.split(":", 1) for line in head.split("\r\n") if ":" in line)
        disposition = {k.strip().lower(): v.strip() for k, v in headers.items()}.get("content-disposition", "")
        params = _header_params(disposition, "content-disposition")
        name = params.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            raise HttpError(400, "malformed multipart body: a part without a field name")
        if name in parts:
            raise HttpError(400, f"field {name} given twice")
        filename = params.get_param("filename", header="content-disposition")
        parts[name] = Part(filename if isinstance(filename, str) else None, body[head_end + 4 : end])
        pos = end + 2 + len(delimiter)
    return parts


def _field_value(name: str, text: str, default: Any) -> Any:
    """A form field's text as the type of its default; HttpError 422 naming the field."""
    text = text.strip()
    if isinstance(default, bool):
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise HttpError(422, f"{name}={text!r} is not a yes/no value (1, 0, true, false, on, off)")
    kind = type(default)
    try:
        return kind(text)
    except ValueError:
        raise HttpError(422, f"{name}={text!r} is not {'an integer' if kind is int else 'a number'}") from None


def request_options(form: dict[str, Part]) -> tuple[DecodeOptions, int, bool]:
    """The decoding fields of a request -> (DecodeOptions, n_best, overlays), DecodeOptions' defaults for
    the rest; HttpError 422 naming the first bad or unknown field. Bounds are DecodeOptions' own, plus the
    server's caps on beam_size and max_len (a request cannot ask for unbounded work)."""
    unknown = sorted(set(form) - set(FORM_FIELDS) - {"image"})
    if unknown:
        raise HttpError(422, f"unknown field {unknown[0]} (the fields: image, {', '.join(FORM_FIELDS)})")
    defaults = {**{f.name: getattr(_DEFAULTS, f.name) for f in fields(DecodeOptions)}, "n_best": 1, "overlays": False}
    values = {}
    for name, part in form.items():
        if name == "image":
            continue
        if part.filename is not None:
            raise HttpError(422, f"{name} is a file; it should be a value")
        values[name] = _field_value(name, part.data.decode("utf-8", errors="replace"), defaults[name])
    n_best, overlays = values.pop("n_best", 1), values.pop("overlays", False)
    opts = replace(_DEFAULTS, **values)
    try:
        check_fields(opts, prefix="")
    except UserError as e:
        raise HttpError(422, str(e)) from None
    for name, cap in (("beam_size", MAX_BEAM), ("max_len", max(MAX_LEN_LIMIT, _DEFAULTS.max_len))):
        if getattr(opts, name) > cap:
            raise HttpError(422, f"{name}={getattr(opts, name)} must be <= {cap} on this server")
    if not 1 <= n_best <= opts.beam_size:
        raise HttpError(422, f"n_best={n_best} must be in 1..beam_size ({opts.beam_size})")
    return opts, n_best, overlays


# --------------------------------------------------------------------------------------------
# The model's thread: requests with the same options decode as one batch
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)  # compared by identity: its tensors have no truth value
class _Job:
    loaded: tuple[str, torch.Tensor, Image.Image]  # (source, (3, S, S) tensor, S x S image): Captioner.load's
    opts: DecodeOptions
    n_best: int
    future: Future


class BatchWorker:
    """One thread owns the model, so requests never compete for the cores inside torch; each time it is
    free it takes the oldest waiting request and every other one waiting with the same options (up to
    max_batch) and decodes them as one batch. At most max_pending requests wait: more are refused (503)."""

    def __init__(self, captioner: Captioner, max_batch: int = MAX_BATCH, max_pending: int = MAX_PENDING) -> None:
        self.captioner = captioner
        self.max_batch, self.max_pending = max_batch, max_pending
        self._jobs: list[_Job] = []
        self._closed = False
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="satkit-serve-model", daemon=True)
        self._thread.start()

    def submit(self, loaded: tuple[str, torch.Tensor, Image.Image], opts: DecodeOptions,
               n_best: int) -> Future:
        """Queue one image; the Future gives (CaptionResult, the size of the batch it was decoded in)."""
        job = _Job(loaded, replace(opts, batch_size=self.max_batch), n_best, Future())
        with self._ready:
            if self._closed:
                raise HttpError(503, "the server is stopping")
            if len(self._jobs) >= self.max_pending:
                raise HttpError(503, f"busy: {len(self._jobs)} requests are waiting; try again")
            self._jobs.append(job)
            self._ready.notify()
        return job.future

    def _next_batch(self) -> list[_Job]:
        with self._ready:
            while not self._jobs and not self._closed:
                self._ready.wait()
            if not self._jobs:
                return []
            first = self._jobs[0]
            batch = [job for job in self._jobs if (job.opts, job.n_best) == (first.opts, first.n_best)]
            batch = batch[: self.max_batch]
            taken = set(map(id, batch))
            self._jobs = [job for job in self._jobs if id(job) not in taken]
            return batch

    def _run(self) -> None:
        while batch := self._next_batch():
            try:
                results = self.captioner.caption_loaded([job.loaded for job in batch], batch[0].opts, batch[0].n_best)
            except Exception as e:  # handed to each waiting request, which answers 500 and logs it
                for job in batch:
                    job.future.set_exception(e)
            else:
                for job, result in zip(batch, results):
                    job.future.set_result((result, len(batch)))

    def close(self) -> None:
        """Decode what is queued, then stop the thread."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        self._thread.join()


# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------
def _data_url(image: Image.Image, kind: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **({"quality": 90} if kind == "JPEG" else {"optimize": False}))
    return f"data:image/{kind.lower()};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def overlay_maps(alphas: np.ndarray, size: int) -> dict[str, str]:
    """alpha (T, g, g) -> per overlay style, the T smoothed maps of satkit.figures (one scale for the caption,
    what caption.py draws) as one grey PNG of T frames stacked top to bottom, size x size each, as a data URL.
    The page scales them to the photo and blends them over it with the style's formula (figures.highlight,
    figures.paper_overlay)."""
    maps = {}
    for style in OVERLAYS:
        weights = overlay_weights(alphas, (size, size), style)  # (T, size, size) in [0, 1]
        frames = np.rint(weights * 255).astype(np.uint8).reshape(-1, size)  # (T * size, size)
        maps[style] = _data_url(Image.fromarray(frames, mode="L"), "PNG")
    return maps


def caption_payload(result: CaptionResult, overlays: bool) -> list[dict[str, Any]]:
    """The captions of one image as JSON: text, scores, words, alphas (T x g x g, rounded), betas, and per
    word the measures of satkit.figures.attention_measures; with overlays, the maps the page draws."""
    captions = []
    for caption in result.captions:
        alphas = caption.alphas.detach().double().cpu().numpy()  # (T, g, g); float64, so 4 decimals print as 4
        entry = {
            "caption": caption.text,
            "score": caption.score,
            "normalized_score": caption.normalized_score,
            "finished": caption.finished,
            "words": caption.words,
            "alphas": np.round(alphas, ALPHA_DIGITS).tolist(),
            "betas": None if caption.betas is None else [round(float(b), ALPHA_DIGITS) for b in caption.betas],
            "measures": [{k: round(v, ALPHA_DIGITS) for k, v in attention_measures(a).items()} for a in alphas],
        }
        if overlays:
            entry["maps"] = overlay_maps(alphas, min(result.image.size[0], MAP_CELL_PX * alphas.shape[-1]))
        captions.append(entry)
    return captions


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------
class CaptionServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that holds the model's worker and what the handlers share. Its request threads
    are joined by server_close (not daemons), so a stop finishes the requests in flight."""

    daemon_threads = False
    block_on_close = True
    request_queue_size = 128  # the listen backlog: 16 clients connecting at once must not be dropped

    def __init__(self, address: tuple[str, int], captioner: Captioner, checkpoint: str, *,
                 examples: Sequence[Path] = (), max_upload_bytes: int = MAX_UPLOAD_BYTES,
                 max_batch: int = MAX_BATCH, max_pending: int = MAX_PENDING, quiet: bool = False) -> None:
        super().__init__(address, CaptionHandler)
        self.captioner = captioner
        self.worker = BatchWorker(captioner, max_batch, max_pending)
        self.examples = list(examples)[:MAX_EXAMPLES]
        self.max_upload_bytes = max_upload_bytes
        self.quiet = quiet
        self.decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)
        self.page = resources.files("satkit").joinpath("serve_page.html").read_bytes()
        self._warm_up()
        cfg = captioner.model_cfg
        self.model_info = {"checkpoint": checkpoint, "encoder": cfg.encoder, "attention": cfg.attention,
                           "gate": cfg.gate, "grid": cfg.enc_size, "image_size": captioner.image_size,
                           "vocab_size": len(captioner.word_map), "device": str(captioner.device)}

    def _warm_up(self) -> None:
        """Caption a grey square once, so that the first visitor does not wait for the lazy imports and the
        first-call set-up of torch and skimage (2.3 s on the 2-core CPU)."""
        side = self.captioner.image_size
        grey = Image.new("RGB", (side, side), (128, 128, 128))
        loaded = [("warm-up", *self.captioner.load(grey))]
        caption_payload(self.captioner.caption_loaded(loaded, DecodeOptions(beam_size=1, max_len=2))[0], True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def health(self) -> dict[str, Any]:
        return {"ok": True, "model": self.model_info,
                "limits": {"max_upload_bytes": self.max_upload_bytes, "beam_size": MAX_BEAM,
                           "max_len": max(MAX_LEN_LIMIT, _DEFAULTS.max_len)},
                "defaults": {**{name: getattr(_DEFAULTS, name) for name in FORM_FIELDS if hasattr(_DEFAULTS, name)},
                             "n_best": 1},
                "overlay": {"floor": HIGHLIGHT_FLOOR, "veil": PAPER_VEIL, "frame_ms": GIF_FRAME_MS}}

    def caption(self, form: dict[str, Part]) -> dict[str, Any]:
        """One request's form -> its answer; HttpError for anything the client got wrong."""
        started = time.perf_counter()
        opts, n_best, overlays = request_options(form)
        upload = form.get("image")
        if upload is None:
            raise HttpError(400, "missing field `image` (the photo, as a file field of a multipart form)")
        name = " ".join((upload.filename or "image").split())[:120] or "image"
        with self.decode_slots:
            try:
                tensor, display = self.captioner.load_bytes(upload.data, name)
            except UserError as e:
                raise HttpError(400, str(e)) from None
        waited = time.perf_counter()
        result, batch = self.worker.submit((name, tensor, display), opts, n_best).result()
        decoded = time.perf_counter()
        payload = {"captions": caption_payload(result, overlays),
                   "grid": int(result.best.alphas.shape[-1]),
                   "image_size": self.captioner.image_size,
                   "model": self.model_info,
                   "decode": {**{k: v for k, v in opts.record().items() if k != "batch_size"}, "n_best": n_best},
                   "batch": batch,
                   "decode_seconds": round(decoded - waited, 4)}
        if overlays:
            side = min(result.image.size[0], IMAGE_SIZE_SHOWN)
            shown = result.image.resize((side, side), Image.Resampling.BILINEAR)
            payload["image"] = _data_url(shown, "JPEG")
        payload["seconds"] = round(time.perf_counter() - started, 4)
        return payload


class CaptionHandler(BaseHTTPRequestHandler):
    """Routes, and the one place a request's errors become its answer."""

    server: CaptionServer
    timeout = REQUEST_TIMEOUT_S
    server_version = "satkit-serve"
    error_content_type = "application/json"
    error_message_format = '{"error": "%(code)d %(message)s"}'  # http.server's own refusals (a bad request line)

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(200, self.server.page, "text/html; charset=utf-8")
        elif path == "/api/health":
            self._json(200, self.server.health())
        elif path == "/api/examples":
            self._json(200, {"examples": [{"name": p.name, "url": f"/examples/{i}"}
                                          for i, p in enumerate(self.server.examples)]})
        elif path.startswith("/examples/") and path[len("/examples/"):].isdigit() \
                and int(path[len("/examples/"):]) < len(self.server.examples):
            example = self.server.examples[int(path[len("/examples/"):])]
            self._send(200, example.read_bytes(), mimetypes.guess_type(example.name)[0] or "application/octet-stream")
        else:
            self._json(404, {"error": f"no such page: {path}"})

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/api/caption":
            self._json(404, {"error": f"no such endpoint: POST {self.path}"})
            return
        try:
            form = parse_multipart(self.headers.get("Content-Type", ""), self._read_body())
            self._json(200, self.server.caption(form))
        except HttpError as e:
            self._json(e.status, {"error": str(e)})
        except Exception as e:  # a bug of ours: the request gets a 500 line and the server goes on (traceback logged)
            traceback.print_exc(file=sys.stderr)
            self._json(500, {"error": f"internal error: {one_line(e)}"})

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise HttpError(411, "the request has no Content-Length (send the form as one body, not chunked)")
        if not length.strip().isdigit():
            raise HttpError(400, f"bad Content-Length {length!r}")
        size, cap = int(length), self.server.max_upload_bytes
        if size > cap:
            self._drain(size)
            raise HttpError(413, f"upload of {size} bytes is over this server's limit of {cap} bytes "
                                 f"({cap / 2**20:g} MiB)")
        if size == 0:
            raise HttpError(400, "empty request body: send a multipart form with the field `image`")
        body = self.rfile.read(size)
        if len(body) < size:
            raise HttpError(400, f"the body ended after {len(body)} of {size} bytes")
        return body

    def _drain(self, size: int) -> None:
        """Read (and drop) an oversized body, up to DRAIN_BYTES, so that a client that sends it all before
        reading (most do) gets the 413 rather than a reset connection."""
        left = min(size, DRAIN_BYTES)
        while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
            left -= len(chunk)

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            if content_type.startswith("text/html"):
                # Nothing from outside this server: scripts and styles are the page's own, images are data/blob URLs.
                self.send_header("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; "
                                 "style-src 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'")
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left; nothing to answer


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------
def make_server(checkpoint: str | Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                device: str = "auto", imports: Sequence[str] = (), examples: Sequence[str] = (),
                max_upload_bytes: int = MAX_UPLOAD_BYTES, quiet: bool = False) -> CaptionServer:
    """Load the checkpoint once and bind host:port (0: any free port); UserError for a missing checkpoint
    (naming `make flickr8k` and `make demo` when it is the default one) or a port in use."""
    path = Path(checkpoint)
    if not path.is_file():
        if str(checkpoint) == DEFAULT_CHECKPOINT:
            raise UserError(f"{DEFAULT_CHECKPOINT} not found: train it with `make flickr8k` (Flickr8k, about 60 min "
                            "on 2 cores) or `make demo` (shapes, about 18 min; then CHECKPOINT=runs/shapes/best.pt), "
                            "or serve another one: --checkpoint PATH (make serve CHECKPOINT=PATH)")
        raise UserError(f"{checkpoint}: checkpoint not found")
    captioner = Captioner.from_checkpoint(path, device=device, imports=imports)
    found, _ = collect_images(list(examples)) if examples else ([], [])
    if not examples and (path.parent / "samples").is_dir():  # `make demo` draws fresh images there
        found, _ = collect_images([str(path.parent / "samples")])
    try:
        return CaptionServer((host, port), captioner, str(checkpoint), examples=found,
                             max_upload_bytes=max_upload_bytes, quiet=quiet)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({one_line(e)}); choose another --port") from None


def serve_until_stopped(server: CaptionServer) -> int:
    """Serve until SIGINT or SIGTERM; then stop accepting (the listening socket closes), finish the
    requests in flight and the model's queue, and return 0. Call from the main thread."""
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if not stop.is_set():
            print(f"{signal.Signals(signum).name}: stopping; finishing the requests in flight", file=sys.stderr,
                  flush=True)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack on stderr
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="satkit-serve-accept")
    thread.start()
    try:
        stop.wait()
    finally:
        server.shutdown()  # serve_forever returns: nothing new is accepted
        _serve_backlog(server)
        server.server_close()  # closes the listening socket, then joins the request threads in flight
        server.worker.close()
        thread.join()
        faulthandler.unregister(signal.SIGUSR1)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped", file=sys.stderr, flush=True)
    return 0


def _serve_backlog(server: CaptionServer) -> None:
    """Take the connections the kernel had already accepted when the stop came, as requests in flight:
    closing the listening socket with them queued would reset them."""
    server.socket.setblocking(False)
    while True:
        try:
            request, address = server.socket.accept()
        except (BlockingIOError, InterruptedError):
            return
        request.setblocking(True)
        server.process_request(request, address)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     add_help=add_help, parents=[import_args_parser()])
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="a best.pt written by train.py "
                        "(default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s; 0 picks a free one")
    parser.add_argument("--host", default="127.0.0.1",
                        help="default: %(default)s, this machine only. 0.0.0.0 opens the page and the API to every "
                             "machine that can reach this one, without any login")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--examples", nargs="*", default=[], metavar="PATH",
                        help="example photos the page offers: files, folders, glob patterns (default: the "
                             "samples/ folder beside the checkpoint, if any)")
    parser.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 2**20,
                        help="largest request body accepted, in MiB (default: %(default)g); larger ones get 413")
    parser.add_argument("--quiet", action="store_true", help="no line per request on stderr")
    parser.add_argument("--debug", action="store_true", help="show a traceback for every error")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body() -> int:
        if not 0 <= args.port <= 65535:
            raise UserError(f"--port={args.port} must be in 0..65535")
        if args.max_upload_mb <= 0:
            raise UserError(f"--max-upload-mb={args.max_upload_mb} must be > 0")
        server = make_server(args.checkpoint, args.host, args.port, device=args.device, imports=args.imports,
                             examples=args.examples, max_upload_bytes=int(args.max_upload_mb * 2**20), quiet=args.quiet)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: --host {args.host}: anyone who can reach this machine can use the page and the API "
                  "(no login, no TLS)", file=sys.stderr)
        print(f"serving {args.checkpoint} on {server.url}  (Ctrl-C stops)", flush=True)
        return serve_until_stopped(server)

    return run_cli(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
