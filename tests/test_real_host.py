"""The pack inside a real ComfyUI, driven the way a user drives it (issue 7; HOST_TESTING.md).

Runs only when ``COMFYUI_PATH`` points at a ComfyUI checkout (and skips at once otherwise, e.g. in CI).
The host runs in its own Python (``COMFYUI_PYTHON``; by default a venv inside or next to the checkout, see
``scripts/host_env.sh``), on 127.0.0.1 at a free port, with everything it writes in a temporary folder:

- tiny random-weight models in the real on-disk formats (the DiffHarmony archive with ``.bin`` weights and
  ``refinement/``, a single-file SD inpainting ``.safetensors``, a text-to-image diffusers folder, a
  PiDiNet ``.pth`` in the authors' layout, a harmony-evaluator ``.safetensors``, a transformers VLM
  folder), mapped with ``extra_model_paths.yaml``, which also maps a ``custom_nodes`` folder holding a
  link to this repository;
- the server log must show no import failure or traceback from the pack; ``/object_info`` must declare
  every node exactly as the pack does, with the model lists filled from those folders;
- every ``workflows/*.json`` is loaded in the real front end in headless Chromium (``loadGraphData``, as a
  drag and drop does), photographed, converted by the front end's own ``graphToPrompt``, queued through
  ``/prompt``, and every image it produces is read back through ``/view``: saved results must have the
  composite's size and its background (mask == 0) byte for byte. Without Chromium or playwright the
  workflow is converted by ``tests/workflow_runner.py`` instead, and the summary says so;
  The shipped Ollama describe workflow talks to a stand-in Ollama server on 127.0.0.1; unless
  HARMONIZE_HOST_AS_SHIPPED is set, working resolutions are capped (256) and the zero-shot "paper" preset
  runs as "fast" so the whole module takes minutes on a CPU (the summary lists every change);
- the workflows must be listed once each among the custom-node templates (``/workflow_templates``), and
  the template served must be the file;
- a long run is cancelled through ``/interrupt`` while the sampler's progress bar moves; the server stays
  healthy and the next run succeeds;
- the server is stopped by its process id.

- every workflow again with its SD model replaced by the files users really have (VARIANTS): a single-file
  checkpoint whose only tokenizer is ComfyUI's bundled one, and a diffusers folder with a tokenizer.json-only
  tokenizer;
- tests/native_host_check.py in the host's Python: the native DiffHarmony path against the pack's diffusers
  path on the same tiny weights and noise (within 1e-3), each necessary difference measured, and a forced
  partial load of every model the pack loads;
- with HARMONIZE_FRONTEND_ROOT, a second server serving that front end (``--front-end-root``) loads, converts
  and runs every workflow too. The newest one on the package registry, e.g.
  ``pip install --no-deps --target /work/fe-new comfyui-frontend-package==1.58.1`` then
  ``HARMONIZE_FRONTEND_ROOT=/work/fe-new/comfyui_frontend_package/static``.

Environment:
  COMFYUI_PATH             the ComfyUI checkout (required)
  HARMONIZE_FRONTEND_ROOT  a front end's static folder (with index.html) to test besides the one ComfyUI pins
  COMFYUI_PYTHON           the host's python (default: <checkout>/venv, <checkout>/.venv,
                           <checkout>/../comfy-venv, then this python)
  HARMONIZE_CHROMIUM       chromium executable (default: `chromium` on PATH); "none" = no browser
  HARMONIZE_HOST_PICTURES  also write each loaded workflow's screenshot there as <name>.png (the README's
                           pictures: docs/workflows)
  HARMONIZE_HOST_THUMBNAILS  also write a <name>.jpg thumbnail there (the template browser's picture)
  HARMONIZE_HOST_START_S   seconds to wait for the server (default 300)
  HARMONIZE_HOST_RUN_S     seconds to wait for one workflow run (default 900)
  HARMONIZE_HOST_RESOLUTION  cap on the pack's "resolution" inputs in the queued prompts (default 256)
  HARMONIZE_HOST_AS_SHIPPED  1: queue the workflows exactly as shipped (no resolution cap, zero-shot
                           "paper" preset kept instead of "fast"; many minutes on a CPU)
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
if not COMFYUI_PATH:
    pytest.skip("COMFYUI_PATH is not set: the real-host test needs a ComfyUI checkout "
                "(scripts/host_env.sh builds one)", allow_module_level=True)
if not (Path(COMFYUI_PATH) / "main.py").is_file():
    pytest.skip(f"COMFYUI_PATH={COMFYUI_PATH} has no main.py: not a ComfyUI checkout", allow_module_level=True)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import tiny_models  # noqa: E402
import workflow_runner  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "ComfyUI-Harmonize"  # the folder name ComfyUI imports the pack as
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
# The sample the shipped workflows load: the pack copies it into ComfyUI's input folder when it loads.
SAMPLES = ("harmonize_sample_cat.jpg", "harmonize_sample_cat_mask.png")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--no-first-run"]
START_S = float(os.environ.get("HARMONIZE_HOST_START_S", "300"))
RUN_S = float(os.environ.get("HARMONIZE_HOST_RUN_S", "900"))
# Working resolutions above this are lowered in the queued prompts, and the zero-shot "paper" preset becomes
# "fast", so a run takes seconds to a minute on a shared CPU; HARMONIZE_HOST_AS_SHIPPED=1 runs the workflows
# exactly as shipped (1024 px DiffHarmony and the paper's zero-shot settings take many minutes on a CPU).
HOST_RESOLUTION = int(os.environ.get("HARMONIZE_HOST_RESOLUTION", "256"))
AS_SHIPPED = os.environ.get("HARMONIZE_HOST_AS_SHIPPED", "") not in ("", "0")
# Models placed in the temporary models folder, as (ComfyUI folder, name inside it).
PLACED = {
    "diffharmony": "DiffHarmony",  # the authors' archive as unpacked: base/ (.bin) + refinement/
    "diffusers": "stable-diffusion-2-base",  # a text-to-image diffusers folder, for zero-shot
    "checkpoints": "tiny-sd15-inpainting.safetensors",  # single-file inpainting checkpoint
    "pidinet": "table5_pidinet-tiny.pth",  # the authors' checkpoint layout
    "harmony_evaluator": "tiny-evaluator.safetensors",
    "LLM": "tiny-llava",  # a vision-language model folder (transformers), for the describe node
}
# Tiny models under the names of the published files the shipped workflows name (their properties.models):
# the templates run as shipped. (ComfyUI folder, file name)
PUBLISHED = (("checkpoints", "512-base-ema.safetensors"), ("pidinet", "table5_pidinet.pth"))

SUMMARY: dict = {"nodes": 0, "workflows": [], "variants": [], "native": [], "newest_front_end": [], "notes": [],
                 "started_s": None}
pytestmark = pytest.mark.timeout(int(START_S + 2 * RUN_S))  # the host start counts toward the first test


# ------------------------------------------------------------------------------------------ the host
def host_python() -> str:
    """The interpreter that runs ComfyUI (see native_host_check.host_python)."""
    import native_host_check

    return native_host_check.host_python(COMFYUI_PATH)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HostError(AssertionError):
    pass


class Host:
    """A running ComfyUI server and what it was given."""

    def __init__(self, root: Path, proc: subprocess.Popen, port: int, log: Path):
        self.root, self.proc, self.port, self.log = root, proc, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.input_dir, self.output_dir = root / "input", root / "output"
        self.client_id = str(uuid.uuid4())
        self.prompts: dict[str, tuple[dict, dict]] = {}  # workflow name -> (queued prompt, UI workflow)

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def request(self, path: str, payload=None, timeout: float = 60) -> bytes:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()

    def get(self, path: str, **params):
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        return json.loads(self.request(path + query))

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """POST /prompt (for ``client_id``: the page's, so the front end shows progress and results); a
        validation error fails with the server's own text."""
        payload = {"prompt": prompt, "client_id": client_id or self.client_id}
        try:
            answer = json.loads(self.request("/prompt", payload))
        except urllib.error.HTTPError as exc:
            raise HostError(f"/prompt refused the workflow: {exc.read().decode(errors='replace')}") from None
        if answer.get("node_errors"):
            raise HostError(f"/prompt node_errors: {json.dumps(answer['node_errors'], indent=1)}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = RUN_S) -> dict:
        """Poll /history until the prompt finished; returns its history entry."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise HostError(f"the server died during the run:\n{self.log_tail()}")
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None \
                    and (entry["status"]["completed"] or entry["status"].get("status_str") == "error"):
                return entry
            time.sleep(0.5)
        raise HostError(f"prompt {prompt_id} did not finish in {timeout:.0f} s:\n{self.log_tail()}")

    def image(self, ref: dict) -> Image.Image:
        data = self.request("/view?" + urllib.parse.urlencode(
            {"filename": ref["filename"], "subfolder": ref.get("subfolder", ""), "type": ref.get("type", "output")}))
        img = Image.open(io.BytesIO(data))
        img.load()
        return img

    def stop(self) -> int | None:
        """Stop the server by its process id (SIGTERM, then SIGKILL); returns its exit code."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        return self.proc.returncode


def probe_host_env(python: str) -> str | None:
    """Why the host environment cannot run ComfyUI, or None when it can."""
    code = "import torch, torchvision, aiohttp, yaml, safetensors, diffusers, transformers, kornia"
    try:
        res = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300,
                             cwd=COMFYUI_PATH)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} cannot run: {exc}"
    if res.returncode != 0:
        return f"{python} lacks what ComfyUI + the pack need: {res.stderr.strip().splitlines()[-1:]}"
    return None


# -------------------------------------------------------------------------------- tiny on-disk models
def write_models(root: Path) -> None:
    """The PLACED models, tiny and random, each in the format a user downloads."""
    from tiny_models import write_refiner  # the refinement/ writer shared with test_diffharmony

    archive = root / "diffharmony" / PLACED["diffharmony"]
    # comfy_layout: 32-group norms, which ComfyUI's own UNet/VAE classes need (the native workflow loads it too)
    tiny_models.save_diffusers_pipeline(archive / "base", in_channels=9, weights="bin", comfy_layout=True)
    write_refiner(archive / "refinement")
    tiny_models.write_condition_vae(archive / "condition_vae")  # the whole archive, as downloaded
    tiny_models.write_inverse(archive / "inverse")

    tiny_models.save_diffusers_pipeline(root / "diffusers" / PLACED["diffusers"], in_channels=4, seed=30)
    write_variant_models(root)

    tok_dir = root / "_tok"
    tok = tiny_models.tiny_tokenizer(tok_dir)
    shutil.rmtree(tok_dir)
    tiny_models.save_single_file(root / "checkpoints" / PLACED["checkpoints"], tiny_models.tiny_unet(9, seed=10),
                                 tiny_models.tiny_vae(seed=11), tiny_models.tiny_text_encoder(len(tok), seed=12),
                                 family="sd1")

    from comfyui_harmonize.pipelines.evaluation import evaluator
    from comfyui_harmonize.pipelines.edges import pidinet

    torch.manual_seed(20)
    pidi = pidinet.PiDiNet(20, 8, True)  # the published "tiny" variant, authors' layout below
    (root / "pidinet").mkdir(parents=True)
    torch.save({"epoch": 19, "state_dict": {f"module.{k}": v for k, v in pidi.state_dict().items()}},
               root / "pidinet" / PLACED["pidinet"])
    torch.manual_seed(22)
    pidi = pidinet.PiDiNet(20, 8, True)
    torch.save({"epoch": 0, "state_dict": {f"module.{k}": v for k, v in pidi.state_dict().items()}},
               root / "pidinet" / "table5_pidinet.pth")
    from comfyui_harmonize.pipelines.sd.models import load_sd

    sd2 = load_sd(root / "diffusers" / PLACED["diffusers"])  # a tiny SD 2-base as one single file
    tiny_models.save_single_file(root / "checkpoints" / "512-base-ema.safetensors", sd2.unet, sd2.vae,
                                 sd2.text_encoder, family="sd2")

    import tiny_vlm

    tiny_vlm.save_tiny_llava(root / "LLM" / PLACED["LLM"])

    torch.manual_seed(21)
    (root / "harmony_evaluator").mkdir(parents=True)
    evaluator.save_evaluator(evaluator.ResNet((1, 1, 1, 1), base_width=8).eval(),
                             root / "harmony_evaluator" / PLACED["harmony_evaluator"])


# The files users really have (issue 11): every workflow also runs with its SD model replaced by
# (a) a single-file checkpoint whose only tokenizer is ComfyUI's bundled one (comfy/sd1_tokenizer; its sidecar
#     .config folder holds the tiny configs but no tokenizer/), SD 1.x inpainting for DiffHarmony and SD 2.x
#     text-to-image (pads with "!") for zero-shot, their text encoders on CLIP's 49408-token vocabulary;
# (b) a diffusers folder whose tokenizer/ has only tokenizer.json (what current transformers save).
VARIANTS = {  # variant -> {loader node: model value}
    "single-file, ComfyUI's tokenizer only": {
        "HarmonizeDiffHarmonyLoader": "checkpoints/tiny-sd15-inpainting-notok.safetensors",
        "HarmonizeDiffHarmonyNativeLoader": "checkpoints/tiny-sd15-inpainting-notok.safetensors",
        "HarmonizeZeroShotLoader": "checkpoints/tiny-sd2-notok.safetensors"},
    "tokenizer.json-only diffusers folder": {
        "HarmonizeDiffHarmonyLoader": "diffusers/tiny-inpaint-tokjson",
        "HarmonizeDiffHarmonyNativeLoader": "diffusers/tiny-inpaint-tokjson",
        "HarmonizeZeroShotLoader": "diffusers/tiny-sd-tokjson"},
}


def write_variant_models(root: Path) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast

    clip_vocab = 49408  # CLIP's BPE vocabulary, ComfyUI's tokenizer's ids (start 49406, end 49407)
    tiny_models.save_single_file(root / "checkpoints" / "tiny-sd15-inpainting-notok.safetensors",
                                 tiny_models.tiny_unet(9, seed=40, comfy_layout=True),
                                 tiny_models.tiny_vae(seed=41, comfy_layout=True),
                                 tiny_models.tiny_text_encoder(clip_vocab, seed=42), family="sd1", tokenizer=False)
    torch.manual_seed(43)
    unet = UNet2DConditionModel(**{**tiny_models.unet_config(4), "use_linear_projection": True}).eval()
    cfg = tiny_models.tiny_text_encoder(clip_vocab, seed=44).config.to_dict()
    cfg.update(hidden_act="gelu", pad_token_id=0)  # SD 2.x: OpenCLIP's GELU, padding with "!" (id 0)
    torch.manual_seed(45)
    tiny_models.save_single_file(root / "checkpoints" / "tiny-sd2-notok.safetensors", unet, tiny_models.tiny_vae(46),
                                 CLIPTextModel(CLIPTextConfig.from_dict(cfg)).eval(), family="sd2", tokenizer=False)
    for name, channels in (("tiny-inpaint-tokjson", 9), ("tiny-sd-tokjson", 4)):
        folder = tiny_models.save_diffusers_pipeline(root / "diffusers" / name, in_channels=channels, seed=50 + channels,
                                                     comfy_layout=True)
        tok = folder / "tokenizer"
        fast = CLIPTokenizerFast.from_pretrained(str(tok))
        shutil.rmtree(tok)
        fast.save_pretrained(str(tok))
        for f in ("vocab.json", "merges.txt"):
            (tok / f).unlink(missing_ok=True)
        assert (tok / "tokenizer.json").is_file()


def composite_and_mask(folder: Path) -> tuple[Image.Image, Image.Image]:
    """The sample composite and mask as ComfyUI's LoadImage / LoadImageMask (red channel) read them."""
    with Image.open(folder / SAMPLES[0]) as img:
        composite = img.convert("RGB")
    with Image.open(folder / SAMPLES[1]) as img:
        mask = img.convert("RGBA").getchannel("R")
    return composite, mask


def image_inputs(workflow: dict) -> tuple[list[str], list[str]]:
    """File names the workflow's LoadImage nodes (composites) and LoadImageMask nodes (masks) read."""
    images, masks = [], []
    for node in workflow["nodes"]:
        if node["type"] == "LoadImage":
            name = node["widgets_values"][0]
            (masks if "mask" in name.lower() else images).append(name)
        elif node["type"] == "LoadImageMask":
            masks.append(node["widgets_values"][0])
    return images, masks


@contextlib.contextmanager
def models_env(root: Path):
    old = os.environ.get("HARMONIZE_MODELS_DIR")
    os.environ["HARMONIZE_MODELS_DIR"] = str(root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HARMONIZE_MODELS_DIR", None)
        else:
            os.environ["HARMONIZE_MODELS_DIR"] = old


# ------------------------------------------------------------------------- a stand-in Ollama server
OLLAMA_ANSWER = ("girl & (foreground) golden autumn & (background) winter\n"
                 "girl & (foreground) warm sunny & (background) cold cloudy\n"
                 "girl & (foreground) bright daylight & (background) dim snowy")


@pytest.fixture(scope="module")
def ollama():
    """An HTTP server on 127.0.0.1 that answers Ollama's POST /api/chat with descriptions in the paper's
    format, so the shipped VLM workflow runs its real HTTP path without a model. Records each request."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append((self.path, body))
            ok = self.path == "/api/chat"
            reply = {"model": body.get("model"), "message": {"role": "assistant", "content": OLLAMA_ANSWER},
                     "done": True} if ok else {"error": "not found"}
            data = json.dumps(reply).encode()
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.requests = requests
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# -------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def host(tmp_path_factory, request):
    python = host_python()
    why = probe_host_env(python)
    if why:
        pytest.skip(f"no working ComfyUI host environment: {why} (scripts/host_env.sh builds one)")
    root = tmp_path_factory.mktemp("comfy_host")
    for sub in ("input", "output", "user/default", "custom_nodes", "models"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "custom_nodes" / PACK_NAME).symlink_to(REPO, target_is_directory=True)
    write_models(root / "models")
    # Nothing is put in the input folder: the pack copies its sample there when ComfyUI loads it.
    # The front end's first-run template browser would cover the canvas in the screenshots.
    (root / "user" / "default" / "comfy.settings.json").write_text(json.dumps(
        {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}))
    mapping = {"harmonize_host_test": {"base_path": str(root / "models"),
                                       **{k: k for k in PLACED},
                                       "custom_nodes": str(root / "custom_nodes")}}
    (root / "extra_model_paths.yaml").write_text(json.dumps(mapping))  # JSON is YAML

    h = start_server(root, python, "comfyui.log", root / "output")
    try:
        SUMMARY["started_s"] = h.started_s
        h.composite, h.mask = composite_and_mask(root / "input")  # as copied by the pack
        yield h
    finally:
        code = h.stop()
        SUMMARY["stopped"] = f"server pid {h.proc.pid} stopped by SIGTERM (exit code {code})"
        _print_summary(request, h, time.monotonic() - h.t0)


def start_server(root: Path, python: str, log_name: str, output: Path, extra_args: tuple = ()) -> Host:
    """Start ComfyUI on a free port with the folders under ``root``; returns once /object_info answers."""
    port = free_port()
    log = root / log_name
    output.mkdir(parents=True, exist_ok=True)
    cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           "--output-directory", str(output), "--input-directory", str(root / "input"),
           "--user-directory", str(root / "user"),
           # its own temp folder: ComfyUI empties <temp>/temp when it starts, so hosts started by other runs
           # on the same checkout would delete this one's preview images before /view reads them back
           "--temp-directory", str(root), "--database-url", f"sqlite:///{root / (log_name + '.db')}",
           "--extra-model-paths-config", str(root / "extra_model_paths.yaml"), *extra_args]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HARMONIZE_MODELS_DIR")}
    env["PYTHONUNBUFFERED"] = "1"
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=COMFYUI_PATH, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    h = Host(root, proc, port, log)
    h.python = python
    h.output_dir, h.t0 = output, t0
    try:
        while True:
            if proc.poll() is not None:
                raise HostError(f"ComfyUI exited with {proc.returncode} before answering:\n{h.log_tail()}")
            try:
                h.object_info = h.get("/object_info")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            if time.monotonic() - t0 > START_S:
                raise HostError(f"ComfyUI did not answer /object_info in {START_S:.0f} s:\n{h.log_tail()}")
            time.sleep(1)
    except BaseException:
        h.stop()
        raise
    h.started_s = time.monotonic() - t0
    return h


@contextlib.contextmanager
def browser_page(url: str, shots: Path, key: str = "browser"):
    """The front end served at ``url`` in headless Chromium, or None (then the Python converter stands in)."""
    exe = os.environ.get("HARMONIZE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if exe.lower() == "none" or not os.path.exists(exe):
        SUMMARY["notes"].append(f"no chromium ({exe}): workflows converted by tests/workflow_runner.py, "
                                "not by the front end")
        yield None
        return
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        SUMMARY["notes"].append("playwright is not installed: workflows converted by tests/workflow_runner.py, "
                                "not by the front end")
        yield None
        return
    if _BROWSER:  # playwright's sync API runs once per thread: a second page comes from the same browser
        pg = _BROWSER[0].new_page(viewport={"width": 1600, "height": 900})
        try:
            yield _prepare_page(pg, url, shots, key, exe, _BROWSER[0])
        finally:
            pg.close()
        return
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        _BROWSER.append(browser)
        try:
            yield _prepare_page(browser.new_page(viewport={"width": 1600, "height": 900}), url, shots, key, exe,
                                browser)
        finally:
            _BROWSER.clear()
            browser.close()


_BROWSER: list = []  # the browser of the open playwright session, if any


def _prepare_page(pg, url: str, shots: Path, key: str, exe: str, browser):
    """Open the front end at ``url`` on ``pg`` and wait until its graph is ready."""
    pg.errors = []
    pg.on("pageerror", lambda exc: pg.errors.append(str(exc)))
    pg.goto(url + "/")
    pg.wait_for_function("window.app && window.app.graph && window.app.canvas", timeout=180_000)
    pg.shots = shots
    pg.frontend = pg.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? null")
    SUMMARY[key] = f"{Path(exe).name} {browser.version}, front end {pg.frontend}"
    return pg


@pytest.fixture(scope="module")
def page(host, tmp_path_factory):
    shots = tmp_path_factory.mktemp("screenshots")
    SUMMARY["screenshots"] = str(shots)
    with browser_page(host.url, shots) as pg:
        yield pg


# ----------------------------------------------------------------------------------- the front end
LOAD_JS = """async (wf) => {
    const app = window.app;
    await app.loadGraphData(wf, true, true, null, {showMissingNodesDialog: false, showMissingModelsDialog: false});
    await new Promise(r => setTimeout(r, 300));
    const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
    const nodes = app.graph.nodes.map(n => ({
        id: n.id, type: n.type, known: !n.has_errors,  // a type the front end lacks loads with has_errors
        widgets: n.serialize().widgets_values ?? null,
        box: [n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title]}));
    return nodes;
}"""
TO_PROMPT_JS = "async () => (await window.app.graphToPrompt()).output"
FIT_JS = """async () => {
    const cmd = window.app.extensionManager?.command;
    if (cmd && !document.body.dataset.harmonizeFocus) {
        await cmd.execute('Workspace.ToggleFocusMode');
        document.body.dataset.harmonizeFocus = '1';
    }
    if (cmd) await cmd.execute('Comfy.Canvas.FitView');
    window.app.canvas.deselectAll?.();
    window.app.canvas.setDirty(true, true);
}"""
PREVIEWS_JS = """() => window.app.graph.nodes
    .filter(n => n.type === 'SaveImage' || n.type === 'PreviewImage')
    .every(n => n.imgs && n.imgs.length && n.imgs.every(i => i.complete && i.naturalWidth > 0))"""
CLIENT_ID_JS = "() => window.comfyAPI.api.api.clientId"
BOUNDS_JS = """() => {  // the nodes' bounding box in page pixels (title bars included), with a margin
    const c = window.app.canvas, ds = c.ds, r = c.canvas.getBoundingClientRect(), title = 30, m = 12;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of window.app.graph.nodes) {
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const px = (x, y) => [(x + ds.offset[0]) * ds.scale + r.left, (y + ds.offset[1]) * ds.scale + r.top];
    const a = px(x0, y0), b = px(x1, y1);
    return [a[0] - m, a[1] - m, b[0] + m, b[1] + m];
}"""


def load_in_front_end(page, workflow: dict, name: str, publish: bool = True) -> dict:
    """Load like a drag and drop, check every node is known and kept its widget values, photograph it,
    and convert it with the front end's graphToPrompt. Returns the API prompt."""
    if page.errors:  # the front end's own start-up (e.g. settings migration on a fresh user folder)
        SUMMARY["notes"].append(f"front-end errors before any workflow was loaded: {page.errors}")
        page.errors.clear()
    nodes = page.evaluate(LOAD_JS, workflow)
    missing = sorted({n["type"] for n in nodes if not n["known"]})
    assert not missing, f"{name}: the front end does not know node types {missing}"
    assert len(nodes) == len(workflow["nodes"]), f"{name}: {len(workflow['nodes'])} nodes in the file, " \
                                                 f"{len(nodes)} in the front end"
    shown = {str(n["id"]): n["widgets"] for n in nodes}  # newer front ends give node ids as strings
    for node in workflow["nodes"]:  # the front end reads the widgets as saved (1.5x omits an empty list)
        if node.get("widgets_values") is not None:
            assert (shown[str(node["id"])] or []) == node["widgets_values"], \
                f"{name}: node {node['id']} ({node['type']}) widgets read as {shown[str(node['id'])]}, " \
                f"saved as {node['widgets_values']}"
    overlaps = []  # the sizes the front end gives the nodes (at least what their widgets need)
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            w = min(a["box"][0] + a["box"][2], b["box"][0] + b["box"][2]) - max(a["box"][0], b["box"][0])
            h = min(a["box"][1] + a["box"][3], b["box"][1] + b["box"][3]) - max(a["box"][1], b["box"][1])
            if w > 0 and h > 0:
                overlaps.append(f"node {a['id']} ({a['type']}) and node {b['id']} ({b['type']}) overlap by "
                                f"{w:.0f}x{h:.0f} px")
    screenshot(page, name, publish=publish)
    assert not overlaps, f"{name}: nodes cover each other's widgets in the front end: {overlaps}"
    assert not page.errors, f"{name}: errors in the page: {page.errors}"
    return page.evaluate(TO_PROMPT_JS)


def screenshot(page, name: str, publish: bool = True) -> Path:
    """The whole graph in view, side bars hidden, into the temporary screenshots folder. With ``publish``,
    the graph's area is also written to HARMONIZE_HOST_PICTURES as <name>.png (the README's pictures:
    graphs as loaded, not results of the tiny random models) and to HARMONIZE_HOST_THUMBNAILS as <name>.jpg
    (the template browser's picture)."""
    page.evaluate(FIT_JS)
    page.wait_for_timeout(500)
    shot = page.shots / f"{name}.png"
    page.screenshot(path=str(shot))
    pictures, thumbs = os.environ.get("HARMONIZE_HOST_PICTURES"), os.environ.get("HARMONIZE_HOST_THUMBNAILS")
    if publish and (pictures or thumbs):
        with Image.open(shot) as img:
            x0, y0, x1, y1 = page.evaluate(BOUNDS_JS)
            graph = img.convert("RGB").crop((max(0, int(x0)), max(0, int(y0)),
                                             min(img.width, int(x1)), min(img.height, int(y1))))
        if pictures:
            Path(pictures).mkdir(parents=True, exist_ok=True)
            graph.save(Path(pictures) / f"{name}.png", optimize=True)
        if thumbs:
            Path(thumbs).mkdir(parents=True, exist_ok=True)
            graph.thumbnail((512, 512))
            graph.save(Path(thumbs) / f"{name}.jpg", quality=85)
    return shot


def wait_for_previews(page, timeout_ms: int = 30_000) -> bool:
    """True once every SaveImage / PreviewImage node of the page shows its image."""
    try:
        page.wait_for_function(PREVIEWS_JS, timeout=timeout_ms)
        return True
    except Exception:  # playwright's TimeoutError
        return False


REPORTS_JS = """() => Array.from(document.querySelectorAll('textarea[data-harmonize-report]')).map(el => {
    const r = el.getBoundingClientRect(), style = getComputedStyle(el);
    return {node: el.dataset.harmonizeReport, text: el.value,
            visible: r.width > 20 && r.height > 10 && style.display !== 'none' && style.visibility !== 'hidden'};
})"""


def check_reports_on_nodes(page, entry: dict, workflow: dict, name: str) -> list[str]:
    """Every node whose run returned text ({"ui": {"text": [...]}}) shows exactly that text on the node, in
    view, through the pack's front-end extension (web/js/harmonize.js). Returns "type#id" of those nodes."""
    types = {str(n["id"]): n["type"] for n in workflow["nodes"]}
    reports = {r["node"]: r for r in page.evaluate(REPORTS_JS)}
    cached = {str(n) for kind, data in entry.get("status", {}).get("messages", [])
              if kind == "execution_cached" for n in data.get("nodes", [])}
    shown = []
    for node_id, out in entry["outputs"].items():
        if not out.get("text"):
            continue
        if node_id in cached:  # taken from ComfyUI's cache: the extension reads its text from the history
            SUMMARY["notes"].append(f"{name}: {types.get(node_id)}#{node_id} came from ComfyUI's cache")
        got = reports.get(node_id)
        assert got is not None, f"{name}: {types.get(node_id)}#{node_id} returned text but the page shows none"
        assert got["text"] == "\n".join(out["text"]), f"{name}: node {node_id} shows {got['text']!r}"
        assert got["visible"], f"{name}: the text of {types.get(node_id)}#{node_id} is not in view"
        shown.append(f"{types.get(node_id)}#{node_id}")
    return shown


def strip_meta(prompt: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


# --------------------------------------------------------------------------------------- the checks
def test_pack_imports_without_errors(host):
    log = host.log_text()
    pack_paths = [str(host.root / "custom_nodes" / PACK_NAME), str(REPO)]
    assert re.search(r"seconds: .*" + re.escape(pack_paths[0]), log), \
        f"the pack is not in ComfyUI's custom-node import list:\n{host.log_tail()}"
    bad = [line for line in log.splitlines()
           if ("IMPORT FAILED" in line or "Cannot import" in line) and any(p in line for p in pack_paths)]
    assert not bad, "\n".join(bad)
    blocks = re.findall(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)*.*", log)
    ours = [b for b in blocks if any(p in b for p in pack_paths)]
    assert not ours, "tracebacks from the pack in the server log:\n" + "\n".join(ours)


def test_pack_copied_its_sample_into_the_input_folder(host):
    """The shipped workflows load the sample by name; the pack put it in ComfyUI's input folder at load."""
    for name in SAMPLES:
        assert (host.input_dir / name).read_bytes() == (REPO / "samples" / name).read_bytes(), name
    end = time.monotonic() + 30  # the server's console may reach the log file a little later
    while "sample images for the shipped workflows copied into" not in host.log_text():
        assert time.monotonic() < end, f"the pack did not say it copied its sample:\n{host.log_tail()}"
        time.sleep(0.5)


def _expected_definitions(models_root: Path) -> dict:
    from comfyui_harmonize import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    def inputs():
        return {k: json.loads(json.dumps(c.INPUT_TYPES())) for k, c in NODE_CLASS_MAPPINGS.items()}

    with models_env(models_root):
        full = inputs()
    empty = models_root.parent / "no_models"
    empty.mkdir(exist_ok=True)
    with models_env(empty):
        bare = inputs()
    return {"classes": NODE_CLASS_MAPPINGS, "names": NODE_DISPLAY_NAME_MAPPINGS, "full": full, "bare": bare}


def test_object_info_declares_every_node_as_the_pack(host):
    exp = _expected_definitions(host.root / "models")
    info = host.object_info
    missing = sorted(set(exp["classes"]) - set(info))
    assert not missing, f"/object_info lacks {missing}"
    model_values = set()
    for key, cls in exp["classes"].items():
        got = info[key]
        assert got["python_module"] == f"custom_nodes.{PACK_NAME}", got["python_module"]
        assert got["display_name"] == exp["names"].get(key, key)
        assert got["category"] == cls.CATEGORY
        assert got["description"] == cls.DESCRIPTION
        assert got["output"] == list(cls.RETURN_TYPES)
        assert got["output_name"] == list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)
        assert got["output_node"] == bool(getattr(cls, "OUTPUT_NODE", False))
        for section in ("required", "optional"):
            want, bare = exp["full"][key].get(section, {}), exp["bare"][key].get(section, {})
            have = got["input"].get(section, {})
            assert list(have) == list(want), f"{key}.{section}: host {list(have)}, pack {list(want)}"
            for name, spec in want.items():
                if isinstance(spec[0], list) and spec[0] != bare[name][0]:
                    # a model list: the host lists at least the models the pack finds in the same folders
                    # (it may also list models of its own models/ folder)
                    assert set(spec[0]) <= set(have[name][0]), f"{key}.{name}: {have[name][0]} lacks {spec[0]}"
                    assert have[name][1:] == spec[1:], f"{key}.{name}: options {have[name][1:]} != {spec[1:]}"
                    model_values.update(have[name][0])
                else:
                    assert have[name] == spec, f"{key}.{name}: host declares {have[name]}, pack {spec}"
    SUMMARY["nodes"] = len(exp["classes"])
    for folder, name in [*PLACED.items(), *PUBLISHED]:  # every placed model shows up in some loader of the pack
        assert any(v == name or v.endswith("/" + name) for v in model_values), \
            f"{folder}/{name} is listed by no loader; model lists: {sorted(model_values)}"


def test_model_folders_registered_with_comfyui(host):
    from comfyui_harmonize.nodes.host import PACK_FOLDERS

    folders = {f["name"]: f["folders"] for f in host.get("/experiment/models")}
    for name in PACK_FOLDERS:
        assert name in folders, f"{name} is not a ComfyUI model folder: {sorted(folders)}"
        mapped = str(host.root / "models" / name)
        default = os.path.join(os.path.realpath(COMFYUI_PATH), "models", name)
        if name in PLACED:
            assert mapped in folders[name], f"{name}: extra_model_paths.yaml's {mapped} missing: {folders[name]}"
        assert any(os.path.realpath(p) == default for p in folders[name]), \
            f"{name}: ComfyUI's own models/{name} is not searched: {folders[name]}"
    assert PLACED["pidinet"] in host.get("/models/pidinet")


def test_workflows_are_listed_once_as_templates(host):
    listing = host.get("/workflow_templates")
    assert PACK_NAME in listing, f"no templates for {PACK_NAME}: {listing}"
    names = listing[PACK_NAME]
    for wf in WORKFLOWS:
        assert wf.stem in names, f"{wf.stem} is not among the templates {names}"
        served = json.loads(host.request(f"/api/workflow_templates/{PACK_NAME}/{urllib.parse.quote(wf.name)}"))
        assert served == json.loads(wf.read_text()), f"the template served for {wf.name} is not the file"
    dup = sorted({n for n in names if names.count(n) > 1})
    assert not dup, (f"templates listed more than once {dup}: ComfyUI lists every *.json in each of the pack's "
                     f"folders example_workflows/, example/, examples/, workflow/, workflows/ and the front end "
                     f"shows each entry")


def _check_outputs(host, name: str, entry: dict, workflow: dict) -> list[str]:
    images, masks = image_inputs(workflow)
    composite = np.asarray(host.composite)
    background = np.asarray(host.mask) == 0
    out_types = {str(n["id"]): n["type"] for n in workflow["nodes"]}
    produced = []
    for node_id, out in entry["outputs"].items():
        for ref in out.get("images", []):
            img = host.image(ref)
            produced.append(f"{out_types.get(node_id, node_id)}#{node_id} {img.size[0]}x{img.size[1]}")
            if ref.get("type") != "output":  # previews may show intermediate stages at their own size
                continue
            assert img.size == host.composite.size, \
                f"{name}: saved image {ref['filename']} is {img.size}, the composite is {host.composite.size}"
            arr = np.asarray(img.convert("RGB"))
            diff = np.any(arr != composite, -1)
            assert not diff[background].any(), \
                f"{name}: {int(diff[background].sum())} background pixels changed in {ref['filename']}"
            assert diff[~background].any(), f"{name}: the foreground of {ref['filename']} is unchanged"
    wanted = {str(n["id"]) for n in workflow["nodes"] if n["type"] in ("SaveImage", "PreviewImage")}
    missing = wanted - set(entry["outputs"])
    assert not missing, f"{name}: output nodes {sorted(missing)} produced nothing"
    assert produced, f"{name}: no image came back"
    return produced


def adjusted(prompt: dict, ollama_url: str, object_info: dict) -> tuple[dict, list[str]]:
    """The prompt with the Ollama backend pointed at the stand-in server and, unless
    HARMONIZE_HOST_AS_SHIPPED is set, the pack's working resolutions capped at HOST_RESOLUTION and the
    zero-shot "paper" preset replaced by "fast" (same stages, a tenth of the UNet work). Returns the
    prompt and what was changed."""
    out, changed = json.loads(json.dumps(prompt)), []
    for key, node in out.items():
        inputs, cls = node["inputs"], node["class_type"]
        if inputs.get("backend") == "ollama" and "url" in inputs:
            changed.append(f"{cls}#{key} url {inputs['url']!r}->stand-in Ollama")
            inputs["url"] = ollama_url
        if AS_SHIPPED or not cls.startswith("Harmonize"):
            continue
        value = inputs.get("resolution")
        spec = object_info[cls]["input"]["required"].get("resolution")
        cap = max(HOST_RESOLUTION, spec[1].get("min", 0) if spec and len(spec) > 1 else 0)  # never below the min
        if isinstance(value, int) and value > cap:
            inputs["resolution"] = cap
            changed.append(f"{cls}#{key} resolution {value}->{cap}")
        spec = object_info[cls]["input"]["required"].get("preset")
        if inputs.get("preset") == "paper" and spec and "fast" in spec[0]:
            inputs["preset"] = "fast"
            changed.append(f"{cls}#{key} preset paper->fast")
    return out, changed


def _run(host, prompt: dict, name: str, client_id: str | None = None) -> dict:
    pid = host.queue(prompt, client_id)
    entry = host.wait(pid)
    status = entry["status"]
    if status.get("status_str") != "success":
        msgs = [m for m in status.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")]
        raise HostError(f"{name} failed in ComfyUI: {json.dumps(msgs, indent=1)}")
    return entry


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_runs_in_the_real_host(host, page, ollama, path):
    from comfyui_harmonize import NODE_CLASS_MAPPINGS

    workflow = json.loads(path.read_text())
    ours = workflow_runner.to_api(workflow, NODE_CLASS_MAPPINGS)
    if page is not None:
        prompt = load_in_front_end(page, workflow, path.stem)
        assert strip_meta(prompt) == ours, ("tests/workflow_runner.to_api disagrees with the front end:\n"
                                            f"front end {json.dumps(strip_meta(prompt))}\nours {json.dumps(ours)}")
        via = "front end"
    else:
        prompt, via = ours, "workflow_runner"
    prompt, changed = adjusted(prompt, ollama.url, host.object_info)
    if changed:
        via += f"; changed {', '.join(changed)}"
    asked = len(ollama.requests)
    t0 = time.monotonic()
    entry = _run(host, prompt, path.stem, page.evaluate(CLIENT_ID_JS) if page is not None else None)
    seconds = time.monotonic() - t0
    produced = _check_outputs(host, path.stem, entry, workflow)
    if any("Ollama" in c for c in changed):
        new = ollama.requests[asked:]
        assert new and all(p == "/api/chat" and b["messages"][0]["images"] for p, b in new), \
            f"{path.stem}: the describe node did not send the composite to the Ollama chat API: {new}"
    if page is not None:  # the results as the user sees them in the graph
        if not wait_for_previews(page):
            SUMMARY["notes"].append(f"{path.stem}: the front end did not show every output image")
        screenshot(page, f"{path.stem}-result", publish=False)
        shown = check_reports_on_nodes(page, entry, workflow, path.stem)
        if shown:
            produced.append(f"text shown on {', '.join(shown)}")
    SUMMARY["workflows"].append(f"{path.name}: converted by the {via}, ran in {seconds:.1f} s, "
                                f"images {', '.join(produced)}")
    host.prompts[path.stem] = (prompt, workflow)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_runs_on_the_files_users_have(host, path, variant):
    """The workflow as converted above, its SD model replaced by the variant's (see VARIANTS)."""
    if path.stem not in host.prompts:
        pytest.skip(f"{path.stem} did not run as shipped in this session")
    prompt, workflow = host.prompts[path.stem]
    prompt = json.loads(json.dumps(prompt))
    swapped = []
    for key, node in prompt.items():
        value = VARIANTS[variant].get(node["class_type"])
        if value is not None:  # the loader's own name for that file (its list decides the folder prefix)
            listed = host.object_info[node["class_type"]]["input"]["required"]["model"][0]
            names = [c for c in listed if c == value or c == value.split("/", 1)[1]]
            assert names, f"{value} is not in the {node['class_type']} list {listed}"
            node["inputs"]["model"] = names[0]
            swapped.append(f"{node['class_type']}#{key}")
    assert swapped, f"{path.stem} has no SD model loader"
    t0 = time.monotonic()
    entry = _run(host, prompt, f"{path.stem} ({variant})")
    _check_outputs(host, path.stem, entry, workflow)
    SUMMARY["variants"].append(f"{path.name} on a {variant}: ran in {time.monotonic() - t0:.1f} s")


def test_native_matches_the_pack_and_partial_loads_run(host, tmp_path):
    """tests/native_host_check.py in the host's Python: the native path vs the pack's diffusers path on the
    same tiny weights and noise, each necessary difference, forced partial loads of every pack model."""
    import native_host_check

    r = native_host_check.run_in_host(host.python, COMFYUI_PATH, tmp_path / "native.json", timeout=RUN_S)
    p = r["parity"]
    assert p["parity"] < 1e-3, p
    assert p["condition_vae_parity"] < 1e-3 and p["condition_vae_vs_vae"] > 1e-3, p
    d = p["differences"]
    SUMMARY["native"] = [
        f"native (ComfyUI loader objects + DiffHarmony Conditioning + ComfyUI sampler + VAE decode) vs the pack's "
        f"diffusers path, same weights, same x_T and ancestral draws, fp32 CPU: max |difference| "
        f"{p['parity']:.2e} of the decoded image (0..1); with the pack fed ComfyUI's integer timesteps "
        f"{p['parity_with_integer_timesteps_in_pack']:.2e}",
        f"differences alone (max on the decoded image): integer timesteps {d['integer_timesteps']:.2e} "
        f"(ComfyUI {p['timesteps']['comfyui']} vs {p['timesteps']['diffusers']}), start noise x{p['start_scale']:.5f} "
        f"{d['start_noise_scale']:.2e}, KSampler's own noise stream {d['ksampler_noise_stream']:.3f}, VAE mean vs "
        f"posterior sample {d['vae_mean_vs_posterior_sample']:.3f}, a working-size mask resized by ComfyUI "
        f"{d['full_size_mask']:.3f} ({p['mask_cells_differing_if_full_size']} of {p['mask_cells']} latent cells)",
        f"KSampler's LATENT through Condition-VAE Decode vs the pack's latent through it: max |difference| "
        f"{p['condition_vae_parity']:.2e} (vs the plain VAE decode of the same latent: {p['condition_vae_vs_vae']:.3f})"]
    for name, e in r["partial_loads"].items():
        assert e["ours"].endswith("forward ran"), (name, e)
        SUMMARY["native"].append(f"forced partial load, {name} ({e['mib']} MiB): {e['ours']}; stock ModelPatcher: "
                                 f"{e['stock']}")
    assert r["native_partial_load"].endswith("(finite)")
    SUMMARY["native"].append(f"native MODEL/CLIP/VAE partially loaded: {r['native_partial_load']}")
    SUMMARY["native"].append(f"native loader, weight_dtype fp8_e4m3fn: {r['fp8']}")


# ------------------------------------------------------------------------- the newest front end
FRONTEND_ROOT = os.environ.get("HARMONIZE_FRONTEND_ROOT", "")


@pytest.fixture(scope="module")
def newest_front_end(host, tmp_path_factory):
    """A second server of the same ComfyUI and folders, serving the front end in HARMONIZE_FRONTEND_ROOT
    (``--front-end-root``), and a page on it."""
    if not FRONTEND_ROOT or not (Path(FRONTEND_ROOT) / "index.html").is_file():
        pytest.skip("HARMONIZE_FRONTEND_ROOT is not a front end's static folder (see the module docstring)")
    h = start_server(host.root, host.python, "comfyui-newest-fe.log", host.root / "output-newest-fe",
                     ("--front-end-root", FRONTEND_ROOT))
    h.python, h.composite, h.mask = host.python, host.composite, host.mask
    try:
        with browser_page(h.url, tmp_path_factory.mktemp("screenshots-newest"), key="newest front end") as pg:
            if pg is None:
                pytest.skip("no browser for the newest front end")
            yield h, pg
    finally:
        h.stop()


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_in_the_newest_front_end(newest_front_end, ollama, path):
    from comfyui_harmonize import NODE_CLASS_MAPPINGS

    h, pg = newest_front_end
    workflow = json.loads(path.read_text())
    prompt = load_in_front_end(pg, workflow, path.stem + "-newest", publish=False)
    ours = workflow_runner.to_api(workflow, NODE_CLASS_MAPPINGS)
    assert strip_meta(prompt) == ours, ("tests/workflow_runner.to_api disagrees with the newest front end:\n"
                                        f"front end {json.dumps(strip_meta(prompt))}\nours {json.dumps(ours)}")
    prompt, changed = adjusted(prompt, ollama.url, h.object_info)
    t0 = time.monotonic()
    entry = _run(h, prompt, path.stem + " (newest front end)", pg.evaluate(CLIENT_ID_JS))
    produced = _check_outputs(h, path.stem, entry, workflow)
    SUMMARY["newest_front_end"].append(f"{path.name}: loaded, converted (= workflow_runner), ran in "
                                       f"{time.monotonic() - t0:.1f} s, images {', '.join(produced)}")


def _sampler_of(prompt: dict) -> tuple[str, dict] | None:
    for key, node in prompt.items():
        if "steps" in node["inputs"] and "seed" in node["inputs"]:
            return key, node
    return None


DIALOG_JS = """() => {
    const dialogs = Array.from(document.querySelectorAll('.p-dialog'));
    const d = dialogs.find(x => /512-base-ema/.test(x.innerText));
    if (!d) return null;
    return {text: d.innerText, buttons: Array.from(d.querySelectorAll('button'))
        .map(b => ({title: b.title || '', disabled: b.disabled, text: b.innerText}))};
}"""


def test_missing_models_are_listed_in_the_front_end_dialog(host, page):
    """A user without the models opens a shipped template: the front end's missing-models dialog lists the
    files of the workflow's properties.models, with a download for the SD 2-base checkpoint."""
    if page is None:
        pytest.skip("no browser: the missing-models dialog is the front end's")
    wf = json.loads((REPO / "workflows" / "zero_shot.json").read_text())
    hidden = []
    try:
        for folder, name in PUBLISHED:  # the files are absent, as on a user's first open
            f = host.root / "models" / folder / name
            f.rename(f.with_name(name + ".hidden"))
            hidden.append(f)
        # a new page: the front end loads its model lists once per page
        fresh = page.context.browser.new_page(viewport={"width": 1600, "height": 900})
        try:
            fresh.goto(host.url + "/")
            fresh.wait_for_function("window.app && window.app.graph && window.app.canvas", timeout=180_000)
            fresh.evaluate("""async (wf) => { await window.app.loadGraphData(wf, true, true, null,
                {showMissingNodesDialog: false, showMissingModelsDialog: true}); }""", wf)
            fresh.wait_for_function(DIALOG_JS, timeout=30_000)
            dialog = fresh.evaluate(DIALOG_JS)
            fresh.screenshot(path=str(page.shots / "missing-models-dialog.png"))
        finally:
            fresh.close()
    finally:
        for f in hidden:
            f.with_name(f.name + ".hidden").rename(f)
    for folder, name in PUBLISHED:
        assert name in dialog["text"], f"{folder}/{name} is not in the missing-models dialog: {dialog['text']!r}"
    sd2 = next(m for n in wf["nodes"] for m in n["properties"].get("models", []) if m["directory"] == "checkpoints")
    offered = [b for b in dialog["buttons"] if b["title"] == sd2["url"] and not b["disabled"]]
    assert offered, f"no download offered for {sd2['url']}: {dialog['buttons']}"
    pth = [b for b in dialog["buttons"] if b["title"].endswith(".pth") and not b["disabled"]]
    SUMMARY["missing_models"] = (f"missing-models dialog lists {', '.join(n for _, n in PUBLISHED)}; download "
                                 f"offered for {sd2['name']}; for table5_pidinet.pth "
                                 f"{'offered' if pth else 'not offered (this front end allows no .pth downloads)'}")


def prompt_messages(ws, pid: str):
    """(type, data) of the websocket's JSON messages that concern prompt ``pid`` (binary previews skipped)."""
    while True:
        msg = ws.recv(timeout=RUN_S)
        if isinstance(msg, bytes):
            continue
        msg = json.loads(msg)
        data = msg.get("data", {})
        if data.get("prompt_id") in (None, pid):
            yield msg["type"], data


def test_interrupt_then_next_run_succeeds(host):
    """Cancel a long run while its sampler reports progress; the server stays up and runs the next one."""
    runs = [(name, p, w) for name, (p, w) in sorted(host.prompts.items()) if _sampler_of(p)]
    if not runs:
        pytest.skip("no workflow with a sampler (steps + seed) ran in this session")
    name, prompt, workflow = runs[0]
    key, _ = _sampler_of(prompt)
    long_run = json.loads(json.dumps(prompt))
    long_run[key]["inputs"]["steps"] = 200
    long_run[key]["inputs"]["seed"] = 1234567  # not cached from the earlier run
    try:
        from websockets.sync.client import connect
    except ImportError:
        connect = None
    progress = []
    if connect is not None:
        ws = connect(f"ws://127.0.0.1:{host.port}/ws?clientId={host.client_id}", max_size=None)
    pid = host.queue(long_run)
    t0 = time.monotonic()
    if connect is not None:
        with ws:  # interrupt once the sampler's progress bar has moved: inside our own step loop
            for kind, data in prompt_messages(ws, pid):
                if time.monotonic() - t0 >= RUN_S:
                    break
                if kind == "progress" and data.get("node") == key:
                    progress.append((data["value"], data["max"]))
                    if data["value"] >= 1:
                        break
                if kind in ("execution_success", "execution_error"):
                    break
        assert progress and progress[-1][0] >= 1 and progress[-1][1] == 200, \
            f"no progress of the sampler's 200 steps: {progress}"
    else:
        while not host.get("/queue")["queue_running"]:
            time.sleep(0.2)
        time.sleep(1)
    host.request("/interrupt", {})
    entry = host.wait(pid)
    kinds = [m[0] for m in entry["status"].get("messages", [])]
    assert "execution_interrupted" in kinds, f"the run was not interrupted: {kinds}"
    interrupted = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_interrupted"][0]
    assert interrupted.get("node_id") == key, f"interrupted in node {interrupted.get('node_id')}, not the sampler"
    stopped_after = time.monotonic() - t0
    assert host.proc.poll() is None, "the server died after the interrupt"
    assert host.get("/system_stats")["system"]["comfyui_version"]
    assert host.get("/queue") == {"queue_running": [], "queue_pending": []}

    again = json.loads(json.dumps(prompt))
    again[key]["inputs"]["seed"] = 7654321
    t1 = time.monotonic()
    entry = _run(host, again, name + " after interrupt")
    _check_outputs(host, name, entry, workflow)
    SUMMARY["interrupt"] = (f"{name}: 200-step run interrupted in the sampler (node {key}) after progress "
                            f"{progress[-1] if progress else '?'} / {stopped_after:.1f} s; server healthy; "
                            f"next run succeeded in {time.monotonic() - t1:.1f} s")


# ------------------------------------------------------------------- cancel outside the sampler (issue 12)
def _api_node(host, cls: str, **given) -> dict:
    """An API-format node of ``cls`` with ``given`` inputs and every other required widget at its default."""
    inputs = dict(given)
    for name, spec in host.object_info[cls]["input"]["required"].items():
        if name in inputs:
            continue
        kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
        if isinstance(kind, list):
            inputs[name] = opts.get("default", kind[0])
        elif "default" in opts:
            inputs[name] = opts["default"]
    return {"class_type": cls, "inputs": inputs}


def _interrupt_when_running(host, prompt: dict, key: str, ready=lambda: True) -> tuple[dict, float, float]:
    """Queue ``prompt``, send /interrupt once ComfyUI reports node ``key`` executing (and ``ready()``), then
    wait for the end. Returns the history entry, seconds from queueing to the interrupt and from the
    interrupt to the end of the prompt."""
    try:
        from websockets.sync.client import connect
    except ImportError:
        pytest.skip("the websockets package is needed to see which node is executing")
    with connect(f"ws://127.0.0.1:{host.port}/ws?clientId={host.client_id}", max_size=None) as ws:
        pid = host.queue(prompt)
        t0 = time.monotonic()
        for kind, data in prompt_messages(ws, pid):
            if kind == "executing" and data.get("node") == key:
                break
            if kind in ("execution_success", "execution_error", "execution_interrupted"):
                raise HostError(f"the run ended before node {key} started: {kind} {data}")
    while not ready():
        if time.monotonic() - t0 > RUN_S:
            raise HostError(f"node {key} never got ready to be interrupted")
        time.sleep(0.1)
    time.sleep(1.0)  # well inside the node: its first strips, or the request in flight
    t1 = time.monotonic()
    host.request("/interrupt", {})
    entry = host.wait(pid)
    return entry, t1 - t0, time.monotonic() - t1


def _assert_interrupted_in(entry: dict, key: str) -> None:
    kinds = [m[0] for m in entry["status"].get("messages", [])]
    errors = [{k: m[1].get(k) for k in ("node_type", "exception_message")} for m in entry["status"]["messages"]
              if m[0] == "execution_error"]
    assert "execution_interrupted" in kinds, f"the run was not interrupted: {kinds} {errors}"
    where = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_interrupted"][0]
    assert where.get("node_id") == key, f"interrupted in node {where.get('node_id')}, expected node {key}"


def _assert_healthy(host) -> None:
    assert host.proc.poll() is None, "the server died after the interrupt"
    assert host.get("/system_stats")["system"]["comfyui_version"]
    assert host.get("/queue") == {"queue_running": [], "queue_pending": []}


def test_interrupt_long_color_transfer_and_hanging_vlm_request(host, ollama):
    """Cancel in stages with no sampler: a colour transfer on a 24-megapixel composite (stops at the next
    strip) and a describe request to a server that never answers (stops while the request is in flight,
    not after its 3600 s timeout); the server stays healthy and runs the next prompt."""
    import socket
    import threading

    big = host.input_dir / "harmonize_reliab_big.png"
    h, w = 4000, 6000
    yy, xx = np.mgrid[0:h:8, 0:w:8].astype(np.float32)
    small = np.stack([xx / w, yy / h, 0.5 + 0.4 * np.sin(xx / 90 + yy / 130)], -1)
    Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR).save(big)
    harmonized = host.input_dir / "harmonize_reliab_harmonized.png"
    Image.fromarray((small[::2, ::2] * 200).astype(np.uint8)).save(harmonized)  # a working-size result
    mask = host.input_dir / "harmonize_reliab_mask.png"  # the composite's aspect ratio, resized by the node
    my, mx = np.mgrid[0:400, 0:600]
    Image.fromarray(((((my - 200) / 120) ** 2 + ((mx - 300) / 150) ** 2 <= 1) * 255).astype(np.uint8)).save(mask)
    transfer = {
        "1": _api_node(host, "LoadImage", image=big.name),
        "2": _api_node(host, "LoadImageMask", image=mask.name, channel="red"),
        "3": _api_node(host, "LoadImage", image=harmonized.name),
        "4": _api_node(host, "HarmonizeColorTransfer", composite=["1", 0], harmonized=["3", 0], mask=["2", 0],
                       feather=0),
        "5": _api_node(host, "PreviewImage", images=["4", 0]),
    }
    entry, before, stop_s = _interrupt_when_running(host, transfer, "4")
    _assert_interrupted_in(entry, "4")
    _assert_healthy(host)
    notes = [f"colour transfer at {w}x{h} interrupted in its node after {before:.1f} s, ended {stop_s:.1f} s "
             f"after /interrupt"]

    hanging = socket.create_server(("127.0.0.1", 0))
    got, hung_up = threading.Event(), threading.Event()

    def serve():  # reads the request, never answers; notes when the client hangs up
        try:
            conn, _ = hanging.accept()
        except OSError:
            return
        with conn:
            while True:
                try:
                    data = conn.recv(1 << 20)
                except OSError:
                    data = b""
                if not data:
                    hung_up.set()
                    return
                got.set()

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{hanging.getsockname()[1]}"
    describe = {
        "1": _api_node(host, "LoadImage", image=harmonized.name),
        "2": _api_node(host, "LoadImageMask", image=mask.name, channel="red"),
        "3": _api_node(host, "HarmonizeDescribe", image=["1", 0], mask=["2", 0], backend="ollama", url=url,
                       timeout=3600.0, retries=0, k=1, local_model="none", model_name="", seed=5),
    }
    describe["4"] = _api_node(host, "PreviewAny", source=["3", 1])  # an output node, so the describe node runs
    try:
        entry, before, stop_s = _interrupt_when_running(host, describe, "3", ready=got.is_set)
        _assert_interrupted_in(entry, "3")
        assert hung_up.wait(30), "the request in flight was not closed after the interrupt"
    finally:
        hanging.close()
    _assert_healthy(host)
    notes.append(f"describe request to a server that never answers (timeout 3600 s) interrupted after "
                 f"{before:.1f} s, ended {stop_s:.1f} s after /interrupt, connection closed")

    after = json.loads(json.dumps(describe))
    after["3"]["inputs"]["url"] = ollama.url
    after["3"]["inputs"]["timeout"] = 60.0
    t = time.monotonic()
    _run(host, after, "describe after the interrupts")
    notes.append(f"next prompt (describe via the stand-in Ollama) succeeded in {time.monotonic() - t:.1f} s")
    SUMMARY["interrupt outside the sampler"] = "; ".join(notes)


def test_models_went_through_comfyui_model_management(host):
    """host.load_to_device wraps the pack's modules in ModelPatcher and loads them via load_models_gpu."""
    if not host.prompts:
        pytest.skip("no workflow ran in this session")
    loads = sorted(set(re.findall(r"Requested to load (\w+)", host.log_text())))
    assert loads, "ComfyUI never loaded a model of the pack through model management"
    SUMMARY["model_management"] = f"loaded through ComfyUI model management: {', '.join(loads)}"


# ---------------------------------------------------------------------------------------- the summary
def _print_summary(request, host, total_s: float) -> None:
    lines = [f"ComfyUI {COMFYUI_PATH} (python {host.python}), 127.0.0.1:{host.port}, "
             f"started in {SUMMARY['started_s'] or 0:.1f} s",
             f"nodes checked in /object_info: {SUMMARY['nodes']}",
             f"workflows run: {len(SUMMARY['workflows'])} of {len(WORKFLOWS)} "
             f"(the pack's sample {SAMPLES[0]}, {host.composite.size[0]}x{host.composite.size[1]}, "
             f"copied into the input folder by the pack)"]
    lines += ["  " + w for w in SUMMARY["workflows"]]
    lines.append(f"workflows on the files users have: {len(SUMMARY['variants'])} runs")
    lines += ["  " + w for w in SUMMARY["variants"]]
    lines.append("native DiffHarmony and model patchers, in process in the host's Python:")
    lines += ["  " + w for w in SUMMARY["native"]]
    lines.append(f"newest front end ({FRONTEND_ROOT or 'HARMONIZE_FRONTEND_ROOT not set'}): "
                 f"{SUMMARY.get('newest front end', 'not run')}")
    lines += ["  " + w for w in SUMMARY["newest_front_end"]]
    for key in ("interrupt", "interrupt outside the sampler", "model_management", "missing_models", "browser",
                "screenshots", "stopped"):
        if SUMMARY.get(key):
            lines.append(f"{key}: {SUMMARY[key]}")
    lines += [f"note: {n}" for n in SUMMARY["notes"]]
    lines.append(f"total {total_s:.1f} s; server log {host.log}")
    text = "\n".join(lines)
    (host.root / "summary.txt").write_text(text + "\n")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        if reporter is not None:
            reporter.write_sep("-", "real ComfyUI host")
            reporter.write_line(text)
        else:
            print(text)
