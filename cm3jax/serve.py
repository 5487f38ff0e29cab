"""`python -m cm3jax.serve --workdir=DIR [--port=8000]`: text-to-image and image-to-text over HTTP.

A small JSON API over one LM run (plus its retrieval index and re-ranker, found as in
`cm3jax.sample`), and a page to try it in a browser. Standard library only.

  GET  /             the page (text-to-image and image-to-text forms)
  GET  /health       {"status": "ok", "workdir", "step", "retrieval": bool, "limits": {...}}
  POST /text2image   {"prompt": str, "num_samples": int = 2, "retrieve": int = 0,
                      "guidance": float = 3.0, "seed": int = 0}
                     -> {"prompt", "retrieved": [caption, ...],
                         "candidates": [{"png_base64", "method", "score"}, ...]}  best first
  POST /image2text   {"image_base64": base64 of a PNG/JPEG/... file (a data: URL is accepted),
                      "retrieve": int = 0}
                     -> {"caption": str}

Bad requests get HTTP 400 with {"error": "<one line naming the field>"} (404 for an unknown
path, 405 for a wrong method, 411 without Content-Length, 413 for a body or image over the
limits, 503 when --max_queue requests already wait). A `UserError` from the generator is a
400 with its message (a batch it fails is retried request by request, so only the request
at fault gets it); anything else is a 500 naming the exception type, logged with its
traceback on the server; no traceback ever reaches the client.

Serving. One worker thread owns the `Generator` (every JAX call is made there); the HTTP
handler threads validate and decode requests, then queue them on a `Batcher`. Requests
arriving within --batch_window_ms of each other with the same options (text2image:
num_samples, retrieve, guidance and seed; image2text: retrieve) become one generator call
of up to --max_batch prompts, always padded to --max_batch rows so the decoder keeps one
shape. Before listening, one text2image (default options) and one image2text request are
run at that shape, so the first user request does not compile; other option values
(num_samples, guidance, retrieve > 0) compile once, on their first use. A request's seed
reproduces its images when it is served in the same batch position (e.g. alone).
SIGINT (Ctrl-C) and SIGTERM stop the server cleanly.

By default the server listens on 127.0.0.1 (this machine only); --host=0.0.0.0 exposes it
to the network, with no authentication.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
import signal
import socket
import threading
import time
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Hashable, Sequence

import numpy as np
from absl import app, flags, logging
from PIL import Image

from cm3jax import logs
from cm3jax.data.images import BadRecordError, decode_image
from cm3jax.errors import UserError, exit_on_user_error
from cm3jax.sampling.batcher import Batcher, BatcherClosed, QueueFull
from cm3jax.sampling.generate import Generator, Text2ImageResult, TextToImageOptions

MAX_GUIDANCE = 20.0
MAX_SEED = 2**31 - 1
MAX_IMAGE_PIXELS = 4096 * 4096  # of an uploaded image, checked before it is decoded
SOCKET_TIMEOUT_S = 30  # a client that stalls while sending its request is dropped
DRAIN_BYTES = 16 * 2**20  # of a refused body, discarded after the 413 so the client reads it (not a reset)
DRAIN_TIMEOUT_S = 5.0
WARMUP_PROMPT = "a red circle"


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for, and the batching parameters."""

    max_prompt_chars: int = 300
    max_image_bytes: int = 2_000_000
    max_num_samples: int = 8
    max_retrieve: int = 4
    max_batch: int = 8
    batch_window_ms: float = 20.0
    max_queue: int = 64  # requests waiting at most; more get 503
    max_caption_tokens: int = 48

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: a base64 image of max_image_bytes plus room for the JSON around it."""
        return 4 * math.ceil(self.max_image_bytes / 3) + 65_536


class HttpError(Exception):
    """A request that is answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --- requests: validation -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Text2ImageKey:
    """text2image requests that can share one generator call."""

    num_samples: int
    retrieve: int
    guidance: float
    seed: int


@dataclasses.dataclass(frozen=True)
class Image2TextKey:
    """image2text requests that can share one generator call."""

    retrieve: int


def parse_json_object(body: bytes) -> dict:
    """The request body as a JSON object; HttpError 400 when it is not one."""
    try:
        value = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise HttpError(400, "body: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise HttpError(400, f"body: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(value, dict):
        raise HttpError(400, f"body: expected a JSON object, got {_json_type(value)}")
    return value


def parse_text2image(body: dict, limits: Limits, retrieval: bool) -> tuple[Text2ImageKey, str]:
    """(batching key, prompt) of a /text2image request; HttpError 400 naming the bad field."""
    _known_fields(body, ("prompt", "num_samples", "retrieve", "guidance", "seed"))
    if "prompt" not in body:
        raise HttpError(400, "prompt: required")
    prompt = body["prompt"]
    if not isinstance(prompt, str):
        raise HttpError(400, f"prompt: expected a string, got {_json_type(prompt)}")
    if not prompt.strip():
        raise HttpError(400, "prompt: empty")
    if len(prompt) > limits.max_prompt_chars:
        raise HttpError(400, f"prompt: {len(prompt)} characters, at most {limits.max_prompt_chars}")
    key = Text2ImageKey(
        num_samples=_integer(body, "num_samples", 2, 1, limits.max_num_samples),
        retrieve=_retrieve(body, limits, retrieval),
        guidance=_number(body, "guidance", 3.0, 0.0, MAX_GUIDANCE),
        seed=_integer(body, "seed", 0, 0, MAX_SEED),
    )
    return key, prompt


def parse_image2text(body: dict, limits: Limits, retrieval: bool, resolution: int) -> tuple[Image2TextKey, np.ndarray]:
    """(batching key, uint8 [R, R, 3] image) of an /image2text request; HttpError 400/413 naming the field."""
    _known_fields(body, ("image_base64", "retrieve"))
    key = Image2TextKey(retrieve=_retrieve(body, limits, retrieval))
    return key, decode_upload(body.get("image_base64"), limits, resolution)


def decode_upload(value: Any, limits: Limits, resolution: int) -> np.ndarray:
    """Base64 image file -> uint8 [R, R, 3] (centre-cropped, resized); HttpError naming image_base64."""
    if value is None:
        raise HttpError(400, "image_base64: required")
    if not isinstance(value, str):
        raise HttpError(400, f"image_base64: expected a base64 string, got {_json_type(value)}")
    if value.startswith("data:") and "," in value:  # a data: URL, as a browser's FileReader makes
        value = value.split(",", 1)[1]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, "image_base64: not valid base64") from None
    if len(data) > limits.max_image_bytes:
        raise HttpError(413, f"image_base64: image of {len(data)} bytes, at most {limits.max_image_bytes}")
    _check_pixels(data)
    try:
        return decode_image(data, resolution, "image_base64")
    except BadRecordError as e:
        raise HttpError(400, str(e)) from None


def _check_pixels(data: bytes) -> None:
    """HttpError 413 for an image whose header announces more than MAX_IMAGE_PIXELS (nothing decoded)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception:  # noqa: BLE001 - unreadable: decode_image names the reason
        return
    if width * height > MAX_IMAGE_PIXELS:
        raise HttpError(413, f"image_base64: image of {width}x{height} pixels, at most {MAX_IMAGE_PIXELS} pixels")


def _known_fields(body: dict, allowed: Sequence[str]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise HttpError(400, f"{unknown[0]}: unknown field (expected: {', '.join(allowed)})")


def _integer(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise HttpError(400, f"{name}: expected an integer, got {_json_type(value)}")
    if not low <= value <= high:
        raise HttpError(400, f"{name}: {value} is outside [{low}, {high}]")
    return value


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HttpError(400, f"{name}: expected a number, got {_json_type(value)}")
    if not (math.isfinite(value) and low <= value <= high):
        raise HttpError(400, f"{name}: {value} is outside [{low}, {high}]")
    return float(value)


def _retrieve(body: dict, limits: Limits, retrieval: bool) -> int:
    k = _integer(body, "retrieve", 0, 0, limits.max_retrieve)
    if k > 0 and not retrieval:
        raise HttpError(400, "retrieve: no retrieval index is loaded (start the server with --index=BUILD_DIR)")
    return k


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# --- the worker: one generator call per batch ----------------------------------------------------


class GenerationWorker:
    """The batcher's work function: runs a batch of compatible requests through the Generator."""

    def __init__(self, generator: Generator, limits: Limits):
        self.generator = generator
        self.limits = limits

    def __call__(self, key: Hashable, items: list[Any]) -> list[Any]:
        """One result per item; an item whose own input the generator rejects gets its UserError."""
        try:
            return self._run(key, items)
        except UserError:
            if len(items) == 1:
                raise
        results: list[Any] = []  # one request spoiled the batch: find it, serve the others
        for item in items:
            try:
                results.extend(self._run(key, [item]))
            except UserError as e:
                results.append(e)
        return results

    def _run(self, key: Hashable, items: list[Any]) -> list[Any]:
        padded = list(items) + [items[0]] * (self.limits.max_batch - len(items))  # one shape per key
        if isinstance(key, Text2ImageKey):
            options = TextToImageOptions(num_samples=key.num_samples, guidance=key.guidance, retrieve=key.retrieve)
            results = self.generator.text2image(padded, options, seed=key.seed)
        elif isinstance(key, Image2TextKey):
            results = self.generator.image2text(np.stack(padded), retrieve=key.retrieve,
                                                max_new_tokens=self.limits.max_caption_tokens)
        else:
            raise TypeError(f"unknown request kind {key!r}")
        return list(results[:len(items)])


def warm_up(batcher: Batcher, resolution: int) -> None:
    """Compiles the default text2image and the image2text calls at the full batch shape."""
    start = time.time()
    text = batcher.submit(Text2ImageKey(num_samples=2, retrieve=0, guidance=3.0, seed=0), WARMUP_PROMPT)
    image = batcher.submit(Image2TextKey(retrieve=0), np.zeros((resolution, resolution, 3), np.uint8))
    text.result()
    image.result()
    logging.info(f"warm-up (compilation) took {time.time() - start:.1f}s")


# --- HTTP ---------------------------------------------------------------------------------------


class ApiServer(ThreadingHTTPServer):
    """The HTTP server; carries what the handlers need."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], generator: Generator, batcher: Batcher, limits: Limits):
        """Binds `address` (port 0: any free port) but does not listen yet: see `server_activate`."""
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.generator = generator
        self.batcher = batcher
        self.limits = limits
        self.page = resources.files("cm3jax.sampling").joinpath("page.html").read_bytes()
        super().__init__(address, ApiHandler, bind_and_activate=False)
        try:
            self.server_bind()
        except BaseException:
            self.server_close()
            raise

    @property
    def url(self) -> str:
        """http://host:port/ the server listens on."""
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class ApiHandler(BaseHTTPRequestHandler):
    """Routes GET / and /health, POST /text2image and /image2text; every error is a JSON line."""

    server: ApiServer
    server_version = "cm3jax-serve"
    timeout = SOCKET_TIMEOUT_S
    _body_read = False  # whether the request's body was read (else it is drained after the reply)
    GET_ROUTES = ("/", "/health")
    POST_ROUTES = ("/text2image", "/image2text")

    def do_GET(self) -> None:  # noqa: N802 - the http.server naming
        """The page or the health record."""
        self._answer(self._get)

    def do_POST(self) -> None:  # noqa: N802
        """A generation request."""
        self._answer(self._post)

    def do_PUT(self) -> None:  # noqa: N802
        """Not allowed anywhere: 405 (404 for an unknown path)."""
        self._answer(self._refuse)

    do_DELETE = do_PATCH = do_PUT

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class signature
        """Request lines go to the absl log, not stderr."""
        logging.info(f"{self.address_string()} {format % args}")

    def _answer(self, route) -> None:
        """Runs a route; turns any error into a JSON reply (never a traceback)."""
        try:
            status, content_type, payload = route()
        except HttpError as e:
            status, content_type, payload = e.status, "application/json", _error_json(str(e))
        except Exception as e:  # noqa: BLE001 - logged here; the client gets one line
            logging.exception(f"{self.command} {self.path} failed")
            status, content_type, payload = 500, "application/json", _error_json(
                f"internal error ({type(e).__name__}); see the server log")
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Cache-Control", "no-store")
            if status == 405:
                allowed = "GET" if self._route() in self.GET_ROUTES else "POST"
                self.send_header("Allow", allowed)
            self.end_headers()
            self.wfile.write(payload)
            self._drain(self._unread_body())
        except OSError:  # the client went away
            self.close_connection = True

    def _unread_body(self) -> int:
        """Bytes of a body that was refused without being read (0 once it was read)."""
        if self._body_read:
            return 0
        try:
            return max(0, int(self.headers.get("Content-Length", 0)))
        except ValueError:
            return 0

    def _drain(self, size: int) -> None:
        """Discards (never keeps) up to DRAIN_BYTES of a refused body within DRAIN_TIMEOUT_S, so a
        client still sending it reads the reply instead of a connection reset."""
        if size <= 0:
            return
        left, deadline = min(size, DRAIN_BYTES), time.monotonic() + DRAIN_TIMEOUT_S
        self.connection.settimeout(DRAIN_TIMEOUT_S)
        while left > 0 and time.monotonic() < deadline:
            chunk = self.rfile.read1(min(left, 65_536))
            if not chunk:
                return
            left -= len(chunk)

    def _route(self) -> str:
        return self.path.split("?", 1)[0]

    def _get(self) -> tuple[int, str, bytes]:
        route = self._route()
        if route == "/":
            return 200, "text/html; charset=utf-8", self.server.page
        if route == "/health":
            generator = self.server.generator
            return 200, "application/json", _json({
                "status": "ok", "workdir": generator.model.workdir, "step": generator.model.step,
                "retrieval": generator.retriever is not None,
                "limits": {**dataclasses.asdict(self.server.limits),
                           "max_body_bytes": self.server.limits.max_body_bytes},
            })
        raise self._route_error()

    def _post(self) -> tuple[int, str, bytes]:
        route = self._route()
        if route not in self.POST_ROUTES:
            raise self._route_error()
        body = parse_json_object(self._read_body())
        limits, generator = self.server.limits, self.server.generator
        retrieval = generator.retriever is not None
        if route == "/text2image":
            key, prompt = parse_text2image(body, limits, retrieval)
            return 200, "application/json", _json(_text2image_json(self._wait(self._submit(key, prompt))))
        key, image = parse_image2text(body, limits, retrieval, int(generator.model.image_tokenizer.resolution))
        return 200, "application/json", _json({"caption": self._wait(self._submit(key, image))})

    def _read_body(self) -> bytes:
        """The body, refused by its Content-Length (never read) when it is over the cap."""
        length = self.headers.get("Content-Length")
        if length is None:
            raise HttpError(411, "Content-Length: header required")
        try:
            size = int(length)
        except ValueError:
            raise HttpError(400, f"Content-Length: not an integer ({length!r})") from None
        if size < 0:
            raise HttpError(400, f"Content-Length: negative ({size})")
        if size > self.server.limits.max_body_bytes:
            raise HttpError(413, f"body: {size} bytes, at most {self.server.limits.max_body_bytes}")
        self._body_read = True
        return self.rfile.read(size)

    def _submit(self, key: Hashable, item: Any) -> Future:
        try:
            return self.server.batcher.submit(key, item)
        except QueueFull:
            raise HttpError(503, "server busy: too many requests waiting, try again later") from None
        except BatcherClosed as e:
            raise HttpError(503, str(e)) from None

    @staticmethod
    def _wait(future: Future) -> Any:
        """The batch's result for this request; UserError -> 400, shutdown -> 503."""
        try:
            return future.result()
        except UserError as e:
            raise HttpError(400, str(e)) from None
        except BatcherClosed as e:
            raise HttpError(503, str(e)) from None

    def _refuse(self) -> tuple[int, str, bytes]:
        raise self._route_error()

    def _route_error(self) -> HttpError:
        """405 for a known path asked with the wrong method, else 404."""
        route = self._route()
        if route in self.GET_ROUTES + self.POST_ROUTES:
            return HttpError(405, f"method: {self.command} is not allowed on {route}")
        return HttpError(404, f"path: no endpoint {route!r} (GET /, /health; POST /text2image, /image2text)")


def _text2image_json(result: Text2ImageResult) -> dict:
    return {"prompt": result.prompt, "retrieved": result.retrieved,
            "candidates": [{"png_base64": png_base64(c.pixels), "method": c.method, "score": c.score}
                           for c in result.candidates]}


def png_base64(pixels: np.ndarray) -> str:
    """A uint8 [H, W, 3] image as a base64 PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _json(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8")


def _error_json(message: str) -> bytes:
    return _json({"error": " ".join(message.split())})


def make_server(generator: Generator, host: str = "127.0.0.1", port: int = 8000,
                limits: Limits = Limits()) -> tuple[ApiServer, Batcher]:
    """Binds host:port, starts the generation worker, warms it up (compiles), then listens.

    Returns the server (call `serve_forever`, then `shutdown` and `server_close`) and the
    batcher (`close` it after the server).

    Raises:
      OSError: the address cannot be bound.
    """
    batcher = Batcher(GenerationWorker(generator, limits), limits.max_batch, limits.batch_window_ms / 1000,
                      max_pending=limits.max_queue, name="generator")
    server = None
    try:
        server = ApiServer((host, port), generator, batcher, limits)
        warm_up(batcher, int(generator.model.image_tokenizer.resolution))
        server.server_activate()
        return server, batcher
    except BaseException:
        if server is not None:
            server.server_close()
        batcher.close()
        raise


# --- CLI ----------------------------------------------------------------------------------------


def define_flags() -> None:
    """Defines the CLI flags; call under `__main__` only (an importer keeps its own flags)."""
    flags.DEFINE_string("workdir", None, "LM run directory (checkpoints, config.json, tokenizers).")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on. The default serves this machine only; "
                        "0.0.0.0 exposes the server (no authentication) to the whole network.")
    flags.DEFINE_integer("port", 8000, "Port to listen on (0 = any free port; the URL is logged).")
    flags.DEFINE_string("index", None, "Retrieval build directory (default: the run's config.retrieval.neighbours).")
    flags.DEFINE_string("reranker", None, "Dual-encoder workdir re-ranking candidates ('' = none).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_integer("tensor", 1, "Tensor-parallel devices for the heads (the rest split rows).")
    flags.DEFINE_integer("max_prompt_chars", 300, "Longest text2image prompt, in characters.")
    flags.DEFINE_integer("max_image_bytes", 2_000_000, "Largest image2text upload, in bytes.")
    flags.DEFINE_integer("max_num_samples", 8, "Most text2image candidates one request may ask for.")
    flags.DEFINE_integer("max_retrieve", 4, "Most retrieved documents one request may ask for.")
    flags.DEFINE_integer("max_batch", 8, "Requests per generator call (every call is padded to this many rows).")
    flags.DEFINE_float("batch_window_ms", 20.0, "How long a request waits for compatible ones to share its call.")
    flags.DEFINE_integer("max_queue", 64, "Requests waiting at most; more are answered 503.")
    flags.DEFINE_integer("max_new_tokens", 48, "image2text: caption tokens at most.")


def limits_from_flags() -> Limits:
    """The Limits the flags ask for; UserError naming a flag that cannot work."""
    f = flags.FLAGS
    for name in ("max_prompt_chars", "max_image_bytes", "max_num_samples", "max_batch", "max_queue",
                 "max_new_tokens"):
        if f[name].value < 1:
            raise UserError(f"--{name} must be >= 1, got {f[name].value}")
    for name in ("max_retrieve", "batch_window_ms"):
        if f[name].value < 0:
            raise UserError(f"--{name} must be >= 0, got {f[name].value}")
    if not 0 <= f.port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {f.port}")
    return Limits(max_prompt_chars=f.max_prompt_chars, max_image_bytes=f.max_image_bytes,
                  max_num_samples=f.max_num_samples, max_retrieve=f.max_retrieve, max_batch=f.max_batch,
                  batch_window_ms=f.batch_window_ms, max_queue=f.max_queue, max_caption_tokens=f.max_new_tokens)


def main(argv: list[str]) -> None:
    """Loads the run, compiles, serves until interrupted."""
    f = flags.FLAGS
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not f.workdir:
        raise UserError("--workdir (an LM run directory) is required")
    logs.quiet_third_party_logs()
    limits = limits_from_flags()
    start = time.time()
    generator = Generator.load(f.workdir, index=f.index, reranker=f.reranker, step=f.step, tensor=f.tensor)
    logging.info(f"loaded {f.workdir} step {generator.model.step} in {time.time() - start:.1f}s")
    try:
        server, batcher = make_server(generator, f.host, f.port, limits)
    except OSError as e:
        raise UserError(f"cannot listen on {f.host}:{f.port} ({e.strerror or e})") from None
    stop_on_signals(server)
    logging.info(f"serving on {server.url}")
    print(f"serving on {server.url}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        batcher.close()
    logging.info("stopped")


def stop_on_signals(server: ApiServer) -> None:
    """SIGINT (Ctrl-C) and SIGTERM end `serve_forever` cleanly (from another thread: it waits for the loop)."""
    def stop(signum: int, frame: Any) -> None:
        logging.info(f"{signal.Signals(signum).name}: shutting down")
        threading.Thread(target=server.shutdown, daemon=True).start()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)


if __name__ == "__main__":
    define_flags()
    app.run(exit_on_user_error(main))
