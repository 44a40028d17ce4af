"""A vision-language model writes the imaging-condition descriptions (zero-shot harmonization, stage 1;
paper appendix B).

The model sees the composite and the mask (as a second image, or as an outline drawn on the composite)
and answers K candidate lines in the paper's format, with words from the vocabulary. The answer goes
through the same strict parser as text typed by hand (``descriptions.parse_descriptions``); an answer
that yields nothing usable is asked again a bounded number of times, each time with the next seed.

Backends:
- ``transformers``: a local image-text-to-text model folder (e.g. in ComfyUI's ``models/LLM``), loaded
  offline with transformers' auto classes;
- ``ollama``: an Ollama server's chat API (``POST {url}/api/chat``), default http://127.0.0.1:11434;
- ``gemini``: Google Gemini through the google-genai SDK (optional dependency), the API key read from
  the environment (``GEMINI_API_KEY`` or ``GOOGLE_API_KEY``), never from a node widget;
- ``manual``: the user's own text.
"""
from __future__ import annotations

import base64
import contextlib
import http.client
import io
import ipaddress
import json
import os
import re
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# diffusers and transformers are imported where first used: importing them adds seconds to ComfyUI's start-up
# (which imports every node module), while a graph that never loads this model does not need them.
from ..core import cancel as cancelling
from ..core import images as im, model_files
from .descriptions import EXAMPLE, FORMAT, Description, DescriptionSet, parse_descriptions, quote, vocabulary_text
from ..core.errors import InputError, WeightsError
from ..core.weights import UNSAFE, load_error, without_unsafe_advice

BACKENDS = ("ollama", "transformers", "gemini", "manual")
MASK_MODES = ("auto", "overlay", "second image")
OLLAMA_URL = "http://127.0.0.1:11434"
OLLAMA_MODEL = "qwen2.5vl:7b"
GEMINI_MODEL = "gemini-2.5-flash"
GEMINI_KEY_ENV = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
DEFAULT_TEMPERATURE = 0.3  # the paper's offline script
DEFAULT_K = 3  # the paper generates 3 descriptions
DEFAULT_RETRIES = 2
DEFAULT_TIMEOUT = 120.0  # seconds; a local server may first have to load the model
DEFAULT_MAX_TOKENS = 256
MAX_SIDE = 1024  # the composite is sent at most this large (long side)
SEED_MODULUS = 2**31  # Ollama and Gemini take 32-bit seeds
OUTLINE_COLOR = (1.0, 0.0, 1.0)  # magenta: rare in photos and not a vocabulary colour
POLL_SECONDS = 0.1  # how often a request in flight checks for cancel

# ---------------------------------------------------------------------------------------- redaction
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")
_SECRET_PARAM = re.compile(r"(?P<name>[?&;](?:[\w.-]*(?:key|token|secret|password|passwd|pwd|auth|sig|signature|"
                           r"credential)[\w.-]*))=[^&#\s'\"]*", re.IGNORECASE)
_SECRET_FIELD = re.compile(r"(?P<name>[\"']?(?:api[_-]?key|access[_-]?token|token|secret|password|authorization)"
                           r"[\"']?\s*[:=]\s*[\"']?)(?:Bearer\s+|Basic\s+)?[^\s\"',}&#]+", re.IGNORECASE)
REDACTED = "***"


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` with credentials removed: the user:password of URLs, the values of query parameters and
    ``key: value`` fields whose names say they hold a key, token, secret or password, every value in
    ``secrets`` and the Gemini keys of the environment. Used on every message and warning of this module,
    including text quoted from a provider's error answer."""
    text = str(text)
    values = [v for v in secrets if v] + [os.environ.get(var, "").strip() for var in GEMINI_KEY_ENV]
    for value in sorted({v for v in values if len(v) >= 4}, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    text = _URL_USERINFO.sub(lambda m: m.group("scheme") + REDACTED + "@", text)
    text = _SECRET_PARAM.sub(lambda m: m.group("name") + "=" + REDACTED, text)
    return _SECRET_FIELD.sub(lambda m: m.group("name") + REDACTED, text)


class BackendError(RuntimeError):
    """A VLM backend could not be used: server unreachable, timeout, HTTP error, missing SDK or key. The
    message is redacted (``redact``) when the error is made, so no credential reaches a log or the UI."""

    def __init__(self, message: str = "", secrets: Sequence[str] = ()):
        super().__init__(redact(message, secrets))


def _wait_for(work: Callable[[], object], cancel: cancelling.Cancel, on_cancel: Callable[[], None] | None = None,
              what: str = "vlm request"):
    """Run ``work()`` and return its result; with ``cancel``, in a worker thread while this thread checks
    ``cancel`` every ``POLL_SECONDS``. When ``cancel`` raises, ``on_cancel()`` aborts the work in flight
    (e.g. closes its socket) and the exception propagates at once; the worker ends on its own."""
    if cancel is None:
        return work()
    cancel()
    done: dict = {}

    def run():
        try:
            done["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            done["error"] = exc

    worker = threading.Thread(target=run, name=f"harmonize {what}", daemon=True)
    worker.start()
    while True:
        worker.join(POLL_SECONDS)
        if not worker.is_alive():
            break
        try:
            cancel()
        except BaseException:
            if on_cancel is not None:
                on_cancel()
            raise
    if "error" in done:
        raise done["error"]
    return done["value"]


# -------------------------------------------------------------------------------------------- prompt
_MASK_SENTENCES = {
    "overlay": "The pasted object is outlined in magenta; the outline only marks it and is not part of the picture.",
    "second image": "The second image is a mask of the pasted object: white where the object is, black elsewhere.",
}


def task_prompt(k: int, mask_as: str, exclude: Sequence[Description] = ()) -> str:
    """The instruction sent with the images: what to describe, the vocabulary, the answer format, K."""
    if mask_as not in _MASK_SENTENCES:
        raise InputError(f"mask_as must be one of {list(_MASK_SENTENCES)}, got {mask_as!r}")
    count = "exactly 1 line" if k == 1 else f"exactly {k} lines"
    parts = [
        "This picture is a composite: one object was cut out of another photo and pasted onto this scene, so "
        "its lighting and colours may not match the scene. " + _MASK_SENTENCES[mask_as],
        "Describe the imaging conditions (brightness, weather, temperature, season, time of day, colour tone, "
        "environment) of the pasted object, called the foreground, and of the rest of the picture, called the "
        "background. Use only words from this vocabulary:\n" + vocabulary_text(),
        f"Answer with {count} and nothing else" + ("" if k == 1 else ", each line a different description")
        + f", in this format:\n{FORMAT}\nOBJECT is a short name of the pasted object (one or two words). Give one "
        f"to four words for each side, those that fit it best.\nExample:\n{EXAMPLE}",
    ]
    if exclude:
        parts.append("Give descriptions different from these ones:\n" + "\n".join(d.line() for d in exclude))
    return "\n\n".join(parts)


# -------------------------------------------------------------------------------------------- images
def outline_overlay(image: torch.Tensor, mask: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """``image`` [H,W,3] with the boundary of ``mask`` [H,W] (at 0.5) drawn in magenta, ``width`` pixels
    thick (default: 1/200 of the long side, at least 2). Pixels off the boundary are unchanged."""
    h, w = mask.shape
    r = width if width is not None else max(2, round(max(h, w) / 200))
    m = (mask >= 0.5).float()[None, None]
    dilated = F.max_pool2d(m, 2 * r + 1, stride=1, padding=r)
    eroded = 1 - F.max_pool2d(1 - m, 2 * r + 1, stride=1, padding=r)
    band = (dilated - eroded)[0, 0, :h, :w] > 0
    color = torch.tensor(OUTLINE_COLOR, dtype=image.dtype)
    return torch.where(band[..., None], color, image)


def to_pil(image: torch.Tensor) -> Image.Image:
    """[H,W,3] (or [H,W]) float 0..1 -> 8-bit PIL image."""
    arr = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(arr, "RGB" if arr.ndim == 3 else "L")


def png_bytes(picture: Image.Image) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def model_images(image: torch.Tensor, mask: torch.Tensor, mask_as: str, max_side: int = MAX_SIDE) -> list[Image.Image]:
    """The pictures shown to the model: the first composite of the batch (downscaled so its long side is
    at most ``max_side``) and its mask, as a second image or as an outline."""
    image, mask = im.image_and_mask(image, mask)
    if image.shape[0] > 1:
        warnings.warn(f"describe: the batch holds {image.shape[0]} composites; the first one is described")
    image, mask = image[:1], mask[:1]
    im.require_foreground(mask, "describe (the model must be shown which object was pasted)")
    h, w = image.shape[1:3]
    if max(h, w) > max_side:
        size = im.fit_size(h, w, max_side, multiple=1)
        image, mask = im.resize_images(image, size), im.resize_masks(mask, size)
    if mask_as == "overlay":
        return [to_pil(outline_overlay(image[0], mask[0]))]
    if mask_as == "second image":
        return [to_pil(image[0]), to_pil((mask[0] >= 0.5).float())]
    raise InputError(f"mask_as must be 'overlay' or 'second image', got {mask_as!r}")


# ------------------------------------------------------------------------------------------ backends
class Backend:
    """A source of answers: ``generate(prompt, images, temperature, seed) -> text``. ``cancel`` (set by
    ``make_backend`` or the caller) is checked while a request is in flight, which it can abort."""

    name = "backend"
    mask_as = "overlay"  # how the mask is shown when the caller says "auto"
    asks_model = True  # False: asking again gives the same text (manual input)
    cancel: cancelling.Cancel = None

    @property
    def label(self) -> str:
        return self.name

    def generate(self, prompt: str, pictures: list[Image.Image], temperature: float, seed: int) -> str:
        raise NotImplementedError


@dataclass
class ManualBackend(Backend):
    """The user's text, read by the same parser as a model's answer."""

    text: str
    name = "manual"
    asks_model = False

    @property
    def label(self) -> str:
        return "the manual text"

    def generate(self, prompt, pictures, temperature, seed) -> str:
        return self.text


def _check_url(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise InputError(redact(f"server URL must look like http://host:port, got {url!r}"))
    try:
        parsed.port
    except ValueError:
        raise InputError(redact(f"server URL {url!r} has an invalid port; expected http://host:port")) from None
    if parsed.username is not None or parsed.password is not None or _SECRET_PARAM.search(url):
        raise InputError(f"server URL {redact(url)!r} carries a credential (user:password@ or a key/token "
                         f"parameter). A workflow saves its widgets, so credentials never go in a node: expected "
                         f"http://host:port (Gemini's key comes from the environment)")
    return url.rstrip("/")


def _recording_opener(url: str, connections: list):
    """A urllib opener (direct for a server on this machine, else with the environment's proxies) that
    appends every HTTP(S) connection it opens to ``connections``, so a request in flight can be aborted by
    closing its socket."""

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req):
            def connect(host, **kw):
                conn = http.client.HTTPConnection(host, **kw)
                connections.append(conn)
                return conn

            return self.do_open(connect, req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req):
            def connect(host, **kw):
                conn = http.client.HTTPSConnection(host, **kw)
                connections.append(conn)
                return conn

            return self.do_open(connect, req, context=self._context)

    handlers = [Http, Https]
    if _is_loopback(url):  # a server on this machine is reached directly, whatever proxy the environment names
        handlers.insert(0, urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers)


def _abort(connections: list) -> None:
    for conn in connections:
        sock = getattr(conn, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            conn.close()


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (TimeoutError, socket.timeout)) or (
        isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, (TimeoutError, socket.timeout)))


@dataclass
class OllamaBackend(Backend):
    """An Ollama server's chat API. Images travel as base64 PNG in the message's ``images``."""

    model: str = OLLAMA_MODEL
    url: str = OLLAMA_URL
    timeout: float = DEFAULT_TIMEOUT
    max_tokens: int = DEFAULT_MAX_TOKENS
    name = "ollama"
    mask_as = "overlay"  # many Ollama vision models take a single image

    def __post_init__(self):
        self.model = self.model.strip() or OLLAMA_MODEL
        self.url = _check_url(self.url.strip() or OLLAMA_URL)

    @property
    def label(self) -> str:
        return f"Ollama model {self.model!r} at {redact(self.url)}"

    def request_body(self, prompt: str, pictures: list[Image.Image], temperature: float, seed: int) -> dict:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt,
                          "images": [base64.b64encode(png_bytes(p)).decode("ascii") for p in pictures]}],
            "stream": False,
            "options": {"temperature": float(temperature), "seed": int(seed), "num_predict": int(self.max_tokens)},
        }

    def generate(self, prompt, pictures, temperature, seed) -> str:
        body = json.dumps(self.request_body(prompt, pictures, temperature, seed)).encode("utf-8")
        parsed = urllib.parse.urlparse(self.url)  # keep a query string (a proxy's parameters) after the path
        endpoint = urllib.parse.urlunparse(parsed._replace(path=parsed.path.rstrip("/") + "/api/chat"))
        req = urllib.request.Request(endpoint, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        connections: list = []
        opener = _recording_opener(self.url, connections)

        def post() -> bytes:
            with opener.open(req, timeout=self.timeout) as resp:
                return resp.read()

        try:
            payload = _wait_for(post, self.cancel, lambda: _abort(connections), "Ollama request")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail).get("error", detail)
            except (ValueError, AttributeError):
                pass
            hint = f" Pull the model first: `ollama pull {self.model}`." if exc.code == 404 else ""
            raise BackendError(f"{self.label} answered HTTP {exc.code}: {quote(redact(str(detail)), 300)}.{hint}") from None
        except Exception as exc:  # noqa: BLE001 - network failures of every kind become one clear error
            if not isinstance(exc, (urllib.error.URLError, OSError, http.client.HTTPException)):
                raise
            if _is_timeout(exc):
                raise BackendError(f"{self.label} gave no answer within {self.timeout:g} s. Is the server busy or "
                                   f"the model still loading? Raise the timeout or check the server.") from None
            if isinstance(exc, (urllib.error.URLError, OSError)):
                reason = getattr(exc, "reason", exc)
                raise BackendError(f"cannot reach Ollama at {redact(self.url)} ({reason}). Is `ollama serve` running "
                                   f"there?") from None
            raise BackendError(f"{self.label}: the connection failed ({exc})") from None
        try:
            data = json.loads(payload.decode("utf-8"))
            content = data["message"]["content"]
            if not isinstance(content, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise BackendError(f"{self.label} sent an answer that is not an Ollama chat reply: "
                               f"{quote(redact(payload.decode('utf-8', 'replace')), 300)}") from None
        return content


def gemini_api_key() -> str:
    """The Gemini API key from the environment; BackendError naming the variables when there is none."""
    for var in GEMINI_KEY_ENV:
        key = os.environ.get(var, "").strip()
        if key:
            return key
    raise BackendError(f"no Gemini API key: set the environment variable {GEMINI_KEY_ENV[0]} (or "
                       f"{GEMINI_KEY_ENV[1]}) before starting ComfyUI. Keys are read from the environment only, "
                       f"never from a node, so that saved workflows never contain them.")


@dataclass
class GeminiBackend(Backend):
    """Google Gemini through the google-genai SDK. ``base_url`` overrides the endpoint (proxies, tests)."""

    model: str = GEMINI_MODEL
    base_url: str = ""
    timeout: float = DEFAULT_TIMEOUT
    api_key: str | None = field(default=None, repr=False)  # None: from the environment
    name = "gemini"
    mask_as = "second image"

    def __post_init__(self):
        self.model = self.model.strip() or GEMINI_MODEL
        self.base_url = _check_url(self.base_url.strip()) if self.base_url.strip() else ""

    @property
    def label(self) -> str:
        return f"Gemini model {self.model!r}" + (f" at {redact(self.base_url)}" if self.base_url else "")

    def _sdk(self):
        try:
            from google import genai  # optional: the gemini extra
            from google.genai import types
        except ImportError:
            raise BackendError("the Gemini backend needs the google-genai package: `pip install google-genai` "
                               "(or `pip install comfyui-harmonize[gemini]`) in ComfyUI's Python.") from None
        return genai, types

    def generate(self, prompt, pictures, temperature, seed) -> str:
        key = self.api_key or gemini_api_key()
        genai, types = self._sdk()
        options = types.HttpOptions(timeout=int(self.timeout * 1000), base_url=self.base_url or None)
        client = genai.Client(api_key=key, vertexai=False, http_options=options)
        contents = [types.Part.from_bytes(data=png_bytes(p), mime_type="image/png") for p in pictures] + [prompt]
        config = types.GenerateContentConfig(temperature=float(temperature), seed=int(seed))
        try:  # the SDK owns its connection: on cancel the call is left to end at its timeout in its thread
            resp = _wait_for(lambda: client.models.generate_content(model=self.model, contents=contents, config=config),
                             self.cancel, what="Gemini request")
        except genai.errors.APIError as exc:
            raise BackendError(f"{self.label} answered HTTP {exc.code}: {quote(str(exc.message or exc), 300)}",
                               secrets=[key]) from None
        except Exception as exc:  # noqa: BLE001 - the SDK's HTTP client (httpx or httpx2) raises its own types
            kinds = {c.__name__ for c in type(exc).__mro__}
            if _is_timeout(exc) or any("Timeout" in k for k in kinds):
                raise BackendError(f"{self.label} gave no answer within {self.timeout:g} s.") from None
            if isinstance(exc, OSError) or kinds & {"TransportError", "NetworkError", "ConnectError", "RequestError"}:
                raise BackendError(f"cannot reach {self.label}: {exc}", secrets=[key]) from None
            raise
        text = resp.text
        if not text:
            reason = resp.candidates[0].finish_reason if resp.candidates else None
            feedback = resp.prompt_feedback
            raise BackendError(f"{self.label} returned no text (finish reason {reason}, prompt feedback {feedback}).")
        return text


# A loaded local model is kept between runs (ComfyUI re-executes nodes often); one at a time.
_LOCAL_CACHE: dict[tuple, "LocalModel"] = {}
_LOCAL_LOCK = threading.Lock()


def _has_config(folder) -> bool:
    return (folder / "config.json").is_file()


def local_models(roots: Sequence[str]) -> dict[str, str]:
    """{name: folder} of model folders (with a config.json) directly in ``roots`` or one level deeper
    (``org/model``), as VLM packs lay out ``models/LLM``."""
    found = model_files.find(roots, model_dir=_has_config, max_depth=2)
    return {name: str(path) for name, path in found.items()}


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


@dataclass(frozen=True)
class LocalModel:
    """A loaded local VLM. ``holder`` is a plain module around ``model`` that is handed to device
    placement: ComfyUI's model management assigns ``.device`` on the module it manages, which
    transformers models expose as a read-only property."""

    processor: object
    model: torch.nn.Module
    holder: torch.nn.Module


def load_local_model(folder: str, dtype: torch.dtype) -> LocalModel:
    """The processor and model of an image-text-to-text model folder, offline; cached (one at a time)."""
    key = (os.path.realpath(folder), str(dtype))
    with _LOCAL_LOCK:
        if key in _LOCAL_CACHE:
            return _LOCAL_CACHE[key]
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise WeightsError(f"{folder} is not a transformers model folder (no config.json). Expected a "
                               f"vision-language (image-text-to-text) model folder in models/LLM.")
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, **_dtype_kwarg(dtype))
        except Exception as exc:  # noqa: BLE001 - every loading failure becomes one message naming the folder
            err = load_error(exc, folder)
            if err.args[0].startswith((UNSAFE, "cannot read")):
                raise err from None
            raise WeightsError(f"cannot load a vision-language model from {folder}: "
                               f"{without_unsafe_advice(str(exc))}. Expected a transformers "
                               f"image-text-to-text model folder (config.json, weights, processor and tokenizer "
                               f"files).") from None
        if not hasattr(processor, "apply_chat_template") or not getattr(processor, "chat_template", None):
            raise WeightsError(f"{folder}: the processor has no chat template (chat_template.jinja or "
                               f"chat_template.json); expected an instruction-tuned vision-language model.")
        model.eval()
        _LOCAL_CACHE.clear()
        _LOCAL_CACHE[key] = LocalModel(processor, model, torch.nn.ModuleDict({"vlm": model}))
        return _LOCAL_CACHE[key]


@dataclass
class TransformersBackend(Backend):
    """A local vision-language model folder, run with transformers' generate on ``device``. ``place``
    (optional) puts the model on the device and returns that device (ComfyUI's model management)."""

    folder: str
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    max_new_tokens: int = DEFAULT_MAX_TOKENS
    place: Callable[[torch.nn.Module], torch.device] | None = field(default=None, repr=False)
    name = "transformers"
    mask_as = "overlay"  # every image-text-to-text model takes at least one image

    @property
    def label(self) -> str:
        return f"local model {os.path.basename(os.path.normpath(self.folder))!r}"

    def generate(self, prompt, pictures, temperature, seed) -> str:
        local = load_local_model(self.folder, self.dtype)
        processor, model = local.processor, local.model
        device = torch.device(self.place(local.holder) if self.place is not None else self.device)
        if self.place is None:
            model.to(device)
        content = [{"type": "image", "image": p} for p in pictures] + [{"type": "text", "text": prompt}]
        inputs = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt")
        inputs = {k: (v.to(device, self.dtype) if v.is_floating_point() else v.to(device))
                  if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        options = {"max_new_tokens": int(self.max_new_tokens), "do_sample": temperature > 0}
        if temperature > 0:
            options["temperature"] = float(temperature)
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        if self.cancel is not None:
            from transformers import StoppingCriteria, StoppingCriteriaList

            cancel = self.cancel

            class CancelPoint(StoppingCriteria):  # checked after every generated token; raises to stop
                def __call__(self, input_ids, scores, **kwargs):
                    cancel()
                    return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

            options["stopping_criteria"] = StoppingCriteriaList([CancelPoint()])
        cancelling.check(self.cancel)
        with torch.random.fork_rng(devices=cuda), torch.inference_mode():
            torch.manual_seed(int(seed))
            out = model.generate(**inputs, **options)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        return processor.batch_decode(new_tokens, skip_special_tokens=True)[0]


def make_backend(name: str, *, model: str = "", url: str = "", timeout: float = DEFAULT_TIMEOUT,
                 max_tokens: int = DEFAULT_MAX_TOKENS, local_model: str = "", roots: Sequence[str] = (),
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 place: Callable | None = None, text: str = "", cancel: cancelling.Cancel = None) -> Backend:
    """Backend ``name`` from node-style settings: ``model`` names the Ollama / Gemini model (empty: the
    default), ``url`` the Ollama server or a Gemini endpoint (empty: the default), ``local_model`` a folder
    name found in ``roots`` (or a path) for transformers, ``text`` the manual answer. ``cancel`` is
    checked while every request is in flight (see ``Backend``)."""
    backend = _make_backend(name, model=model, url=url, timeout=timeout, max_tokens=max_tokens,
                            local_model=local_model, roots=roots, device=device, dtype=dtype, place=place, text=text)
    backend.cancel = cancel
    return backend


def _make_backend(name: str, *, model: str, url: str, timeout: float, max_tokens: int, local_model: str,
                  roots: Sequence[str], device, dtype, place, text: str) -> Backend:
    if timeout <= 0:
        raise InputError(f"timeout must be positive seconds, got {timeout}")
    if name == "ollama":
        return OllamaBackend(model=model, url=url, timeout=timeout, max_tokens=max_tokens)
    if name == "gemini":
        return GeminiBackend(model=model, base_url=url, timeout=timeout)
    if name == "manual":
        return ManualBackend(text)
    if name == "transformers":
        found = local_models(roots)
        if local_model and local_model not in found and os.path.isdir(local_model):
            folder = local_model
        else:
            folder = str(model_files.resolve(local_model, found, "local model", roots,
                                             "a transformers vision-language model folder (config.json, "
                                             "weights, processor, tokenizer) in models/LLM"))
        return TransformersBackend(folder, device=device, dtype=dtype, max_new_tokens=max_tokens, place=place)
    raise InputError(f"backend must be one of {list(BACKENDS)}, got {name!r}")


# ---------------------------------------------------------------------------------------- describing
def describe(backend: Backend, image: torch.Tensor, mask: torch.Tensor, k: int = DEFAULT_K,
             retries: int = DEFAULT_RETRIES, temperature: float = DEFAULT_TEMPERATURE, seed: int = 0,
             mask_as: str = "auto", max_side: int = MAX_SIDE,
             callback: Callable[[int, int], None] | None = None) -> DescriptionSet:
    """K candidate descriptions of the composite ``image`` with ``mask`` from ``backend``.

    The model is asked for K lines; an answer that yields fewer than K new candidates is followed by a
    new request for the missing ones (excluding those found), up to ``retries`` extra requests. Call
    ``n`` uses seed ``seed + n`` (mod 2**31) so asking again can give a different answer. No candidate
    after every attempt -> InputError quoting the last answer. Fewer than K -> a warning and those found.
    A backend that does not ask a model (manual text) gives every candidate of its text, whatever K.
    The returned set's ``ask_again(tried)`` asks the backend for one more description different from
    ``tried`` (None when it cannot give one)."""
    if not 1 <= int(k) <= 16:
        raise InputError(f"k (number of candidate descriptions) must be 1..16, got {k}")
    if not 0 <= int(retries) <= 20:
        raise InputError(f"retries must be 0..20, got {retries}")
    if not 0.0 <= float(temperature) <= 2.0:
        raise InputError(f"temperature must be in 0..2, got {temperature}")
    if mask_as not in MASK_MODES:
        raise InputError(f"mask_as must be one of {list(MASK_MODES)}, got {mask_as!r}")
    mode = backend.mask_as if mask_as == "auto" else mask_as
    pictures = model_images(image, mask, mode, max_side) if backend.asks_model else []
    attempts = int(retries) + 1 if backend.asks_model else 1
    calls = [0]

    def ask(n: int, exclude: Sequence[Description]) -> str:
        cancelling.check(backend.cancel)
        call_seed = (int(seed) + calls[0]) % SEED_MODULUS
        calls[0] += 1
        return backend.generate(task_prompt(n, mode, exclude), pictures, float(temperature), call_seed)

    found: list[Description] = []
    dropped: list[str] = []
    answers: list[str] = []
    problem: InputError | None = None
    for attempt in range(attempts):
        answers.append(ask(int(k) - len(found), found))
        if callback is not None:
            callback(attempt + 1, attempts)
        try:
            cands, out = parse_descriptions(answers[-1])
        except InputError as exc:
            problem = exc
            continue
        dropped += [w for w in out if w not in dropped]
        keys = {d.key() for d in found}
        for cand in cands:  # text typed by hand: every line is a candidate
            if cand.key() not in keys and (len(found) < k or not backend.asks_model):
                keys.add(cand.key())
                found.append(cand)
        if len(found) >= k:
            break
        problem = InputError(f"only {len(found)} different description(s) of {k} so far")
    if not found:
        advice = ("Check the text." if not backend.asks_model else
                  "Try another model, a higher temperature, more retries, or the manual backend.")
        raise InputError(f"{backend.label} gave no usable description in {attempts} attempt(s). {advice} "
                         f"Last problem: {problem}")
    if len(found) < k and backend.asks_model:
        warnings.warn(f"describe: {backend.label} gave {len(found)} different description(s) of the {k} asked "
                      f"for in {attempts} attempt(s)")
    raw = answers[0] if len(answers) == 1 else "\n".join(
        f"--- answer {i + 1} ---\n{a}" for i, a in enumerate(answers))

    def ask_again(tried: Sequence[Description]) -> Description | None:
        """One more description that is not in ``tried``, or None. The request lists ``tried`` and the
        candidates as descriptions to avoid; parse failures are asked again like the first answer."""
        tried_keys = {d.key() for d in tried}
        exclude = list(dict.fromkeys([*tried, *found]))
        for _ in range(attempts):
            try:
                cands, _ = parse_descriptions(ask(1, exclude))
            except InputError:
                continue
            except BackendError as exc:
                warnings.warn(f"describe: asking {backend.label} for a new description failed: {exc}")
                return None
            for cand in cands:
                if cand.key() not in tried_keys:
                    return cand
        return None

    return DescriptionSet(found, ask_again=ask_again if backend.asks_model else None, raw=raw,
                          dropped=tuple(dropped))
