"""A table of bad inputs and faults, each with its defined outcome.

Every row runs in a sandbox: inputs in ``sb.inp``, the output folder ``sb.out``, the working directory the
sandbox itself. A row states either the exact error type and a fragment of its message, or a check of the
behaviour (a warning, a value, an exit code and message). For every row the harness also asserts that
no tensor handed in (registered with ``sb.t``) was modified, and that no file outside ``sb.out`` (and
the row's own ``inputs/``, which it writes while setting up) was created or changed: the sandbox, its
working directory and the session's tiny models are snapshotted before and after.

Rows that used to hang carry a pytest-timeout marker: the bound is the test runner's, never a timing
assertion.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import socket
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_harmonize.commands import harmonize as cli
from comfyui_harmonize.nodes import color as color_nodes
from comfyui_harmonize.pipelines.color import lut, restore, transfer
from comfyui_harmonize.pipelines.core import image_io, images
from comfyui_harmonize.pipelines.core import weights as weights_module
from comfyui_harmonize.pipelines.core.errors import InputError, WeightsError
from comfyui_harmonize.pipelines.core.weights import UNSAFE, load_state_dict
from comfyui_harmonize.pipelines.describe import vlm
from comfyui_harmonize.pipelines.diffharmony import pipeline as dh
from comfyui_harmonize.pipelines.diffharmony import refiner as rf
from comfyui_harmonize.pipelines.evaluation import metrics
from comfyui_harmonize.commands import benchmark as bench_cli
from comfyui_harmonize.pipelines.ihd import benchmark as bm
from comfyui_harmonize.pipelines.ihd import dataset as ihd
from conftest import make_composite


# -------------------------------------------------------------------------------------------- harness
@dataclass
class Sandbox:
    root: Path
    models: Path
    monkeypatch: pytest.MonkeyPatch
    tensors: list = field(default_factory=list)

    @property
    def inp(self) -> Path:
        return self.root / "inputs"

    @property
    def out(self) -> Path:
        return self.root / "out"

    def t(self, x: torch.Tensor) -> torch.Tensor:
        """Register a tensor handed to the code under test: it must come back unmodified."""
        self.tensors.append((x, x.clone()))
        return x

    def pair(self, h=48, w=64, batch=1, seed=0):
        image, mask = make_composite(h, w, batch, seed)
        return self.t(image), self.t(mask)

    def png(self, name: str, array: np.ndarray) -> Path:
        path = self.inp / name
        Image.fromarray(array).save(path)
        return path


def snapshot(*roots: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    state = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            if skip is not None and Path(dirpath).resolve() == skip.resolve():
                dirnames[:] = []
                continue
            for name in filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                state[str(p)] = (st.st_size, st.st_mtime_ns)
    return state


@dataclass
class Row:
    run: Callable[[Sandbox], object]
    raises: type | None = None
    match: str | None = None
    check: Callable[[object, Sandbox], None] | None = None
    warns: str | None = None


def exits(code: int, fragment: str):
    def check(result, sb):
        rc, err = result
        assert rc == code, err
        assert fragment in err, err
        assert "Traceback" not in err
    return check


def run_cli(*argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as exc:  # argparse usage errors
            rc = exc.code
    return rc, err.getvalue()


def cli_pair(sb: Sandbox, mask_h: int = 40) -> tuple[Path, Path]:
    image, mask = make_composite(40, 60)
    comp = sb.png("c.png", (image[0].numpy() * 255).astype(np.uint8))
    m = (make_composite(mask_h, 60)[1][0].numpy() * 255).astype(np.uint8)
    return comp, sb.png("m.png", m)


def color_match_cli(sb, *extra, mask_h=40):
    comp, mask = cli_pair(sb, mask_h)
    return run_cli("--method", "color-match", comp, mask, *extra)


def dh_model(sb: Sandbox) -> Path:
    return sb.models / "diffharmony" / "DiffHarmony"


class _Payload:
    def __reduce__(self):  # would run code when unpickled
        return (os.system, ("echo pwned",))


def copy_pipeline(sb: Sandbox) -> Path:
    dst = sb.inp / "pipe"
    shutil.copytree(dh_model(sb) / "base", dst)
    return dst


def hanging_server():
    """A server that reads requests and never answers; returns (url, close)."""
    sock = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=conn: (c.recv(1 << 20), c.recv(1 << 20)), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{sock.getsockname()[1]}", sock.close


# --------------------------------------------------------------------------------------------- rows
def _uint8_image_is_scaled(sb):
    image, mask = sb.pair()
    as_bytes = sb.t((image * 255).round().to(torch.uint8))
    return images.image_batch(as_bytes), images.image_batch(as_bytes.float() / 255)


def _uint8_mask_noise(sb):
    mask = sb.t(torch.full((1, 8, 8), 3, dtype=torch.uint8))
    return images.mask_batch(mask, 8, 8)


def _feather_wider_than_object(sb):
    image, mask = sb.pair(64, 64)
    return images.paste(sb.t(image * 0.5), image, mask, feather=200), image, mask


def _feather_large_radius(sb):
    image, mask = sb.pair(600, 800)
    return images.feather_mask(mask, 256)


def _empty_mask_diffharmony(sb):
    sd = dh.load_diffharmony(sb.models / "diffusers" / "tiny-inpaint")
    image, _ = sb.pair(32, 32)
    return dh.harmonize(sd, image, sb.t(torch.zeros(1, 32, 32)), steps=1, resolution=32), image


def _odd_size_restore(sb):
    image, mask = sb.pair(77, 101)
    return restore.restore(sb.t(torch.rand(1, 40, 56, 3)), image, mask)


def _grey_and_rgba(sb):
    image, mask = sb.pair(32, 32)
    grey = sb.t(image[..., :1].clone())
    rgba = sb.t(torch.cat([image, torch.ones(1, 32, 32, 1)], -1))
    return restore.restore(grey, grey, mask), restore.restore(rgba, rgba, mask)


def _save_lut(sb, prefix):
    table = lut.Lut3D(lut.identity_table(3).float())
    sb.out.mkdir(exist_ok=True)
    return color_nodes.HarmonizeSaveLUT().run(table, prefix)


def _lut_through_symlink(sb):
    sb.out.mkdir(exist_ok=True)
    (sb.out / "elsewhere").symlink_to(sb.inp, target_is_directory=True)
    return _save_lut(sb, "elsewhere/look")


def _lut_never_overwrites(sb):
    first = _save_lut(sb, "look")["result"][0]
    before = (sb.out / first).read_bytes()
    second = _save_lut(sb, "look")["result"][0]
    return first, second, before, (sb.out / first).read_bytes()


def _sixteen_bit(sb, value):
    path = sb.inp / "g16.png"
    Image.fromarray(np.full((8, 8), value, np.uint16)).save(path)
    return image_io.read_image(path), image_io.read_mask(path)


def _rgba_cutout_mask(sb):
    rgba = np.full((20, 20, 4), 255, np.uint8)  # opaque white everywhere but a cut-out in alpha
    rgba[..., 3] = 0
    rgba[5:11, 5:15, 3] = 255  # 60 of 400 pixels = 15 %
    rgba[..., :3] = np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    return image_io.read_mask(sb.png("cut.png", rgba))


def _float_tiff(sb, top):
    path = sb.inp / "f.tif"
    Image.fromarray(np.linspace(0, top, 64, dtype=np.float32).reshape(8, 8)).save(path)
    return image_io.read_image(path)


def _corrupt_png(sb):
    path = sb.inp / "bad.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return image_io.read_image(path)


def _pickle_file(sb):
    path = sb.inp / "evil.bin"
    torch.save({"w": torch.zeros(1), "x": _Payload()}, path)
    return load_state_dict(path)


def _pickle_in_unet(sb, sub):
    pipe = copy_pipeline(sb)
    target = next(p for p in (pipe / sub).iterdir() if p.suffix == ".bin")
    with open(target, "wb") as f:
        pickle.dump({"x": _Payload()}, f)
    return dh.load_diffharmony(pipe)


def _bad_scheduler_config(sb):
    pipe = copy_pipeline(sb)
    (pipe / "scheduler" / "scheduler_config.json").write_text("{not json")
    return dh.load_diffharmony(pipe)


def _unreadable_weights(sb):
    path = sb.inp / "w.safetensors"
    path.write_bytes(b"x")
    import safetensors.torch

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    sb.monkeypatch.setattr(safetensors.torch, "load_file", denied)  # (root reads any file: simulate the refusal)
    if hasattr(weights_module, "load_file"):
        sb.monkeypatch.setattr(weights_module, "load_file", denied)
    return load_state_dict(path)


def _folder_rerun(sb):
    comps, masks = sb.inp / "c", sb.inp / "m"
    comps.mkdir(), masks.mkdir()
    for name, seed in (("a", 0), ("b", 1)):
        image, mask = make_composite(24, 32, seed=seed)
        Image.fromarray((image[0].numpy() * 255).astype(np.uint8)).save(comps / f"{name}.png")
        Image.fromarray((mask[0].numpy() * 255).astype(np.uint8)).save(masks / f"{name}.png")
    args = ("--method", "color-match", comps, masks, "-o", sb.out, "--resolution", "64")
    first = run_cli(*args)
    before = snapshot(sb.out)
    (sb.out / "b.png").unlink()  # as if the first run had stopped before b
    second = run_cli(*args)
    return first, second, before, snapshot(sb.out)


def _benchmark(sb, *extra):
    from ihd_synthetic import make_ihd

    data = make_ihd(sb.inp / "ihd")
    return data, ["--data", str(data), "--out", str(sb.out), "--quiet", "--method", "composite", "--subsets",
                  "HFlickr", "--limit", "2", *extra]


def _benchmark_failed_save(sb):
    data, argv = _benchmark(sb, "--save-images")

    def fail(image, path):
        raise OSError(28, "No space left on device", str(path))

    real = bm.save_png
    sb.monkeypatch.setattr(bm, "save_png", fail)
    with pytest.raises(OSError):
        bm.run(bench_cli.parse_args(argv))
    rows_after_failure = bm.read_rows(sb.out)
    sb.monkeypatch.setattr(bm, "save_png", real)
    bm.run(bench_cli.parse_args(argv))
    return rows_after_failure, sorted(p.name for p in (sb.out / "images").iterdir())


def _benchmark_resume_missing_image(sb):
    data, argv = _benchmark(sb, "--save-images")
    bm.run(bench_cli.parse_args(argv))
    images_dir = sb.out / "images"
    victim = sorted(images_dir.iterdir())[0]
    victim.unlink()
    seen = []
    bm.run(bench_cli.parse_args(argv), on_image=seen.append)
    return victim.stem, seen, victim.is_file()


def _ollama_unreachable(sb, url):
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    image, mask = sb.pair(32, 32)
    backend = vlm.make_backend("ollama", url=url.format(port=port), timeout=5)
    with pytest.raises(vlm.BackendError) as err:
        vlm.describe(backend, image, mask, k=1, retries=0)
    return str(err.value), backend.label


def _refused_url(sb, url, backend="ollama"):
    with pytest.raises(InputError) as err:
        vlm.make_backend(backend, url=url)
    assert "carries a credential" in str(err.value)
    return str(err.value)


def _ollama_hangs(sb):
    url, close = hanging_server()
    try:
        image, mask = sb.pair(32, 32)
        return vlm.describe(vlm.make_backend("ollama", url=url, timeout=1), image, mask, k=1, retries=0)
    finally:
        close()


def _provider_error_body(sb):
    sb.monkeypatch.setenv("GEMINI_API_KEY", "AIzaSyTESTKEY123456")
    return vlm.BackendError('Gemini answered HTTP 400: {"error": "API key AIzaSyTESTKEY123456 not valid", '
                            '"api_key": "other-secret-value", "url": "https://x/y?key=abc123"}')


def _no_secret(*secrets, marked=True):
    """No secret in the message (and label); ``marked``: the place where one was says so."""
    def check(result, sb):
        text = " ".join(map(str, result if isinstance(result, tuple) else (result,)))
        for s in secrets:
            assert s not in text, text
        assert not marked or vlm.REDACTED in text
    return check


def _check_scaled(result, sb):
    scaled, reference = result
    assert scaled.dtype == torch.float32 and torch.equal(scaled, reference)


def _check_feather_clamped(result, sb):
    out, image, mask = result
    inside = mask[0] >= 0.5
    assert not torch.equal(out[0][inside], image[0][inside])  # the object is still pasted, not faded away
    assert torch.equal(out[0][~inside], image[0][~inside])


def _check_rerun(result, sb):
    (rc1, err1), (rc2, err2), before, after = result
    assert rc1 == rc2 == 0, err1 + err2
    assert sorted(Path(p).name for p in after) == ["a.png", "b.png"]  # b computed again, no a_1.png
    a = str(sb.out / "a.png")
    assert after[a] == before[a]  # the finished one was not touched


def _check_failed_save(result, sb):
    rows_after_failure, names = result
    assert rows_after_failure == {}  # no row for the image that was never saved
    assert len(names) == 2


ROWS: dict[str, Row] = {
    # ---- IMAGE / MASK tensors
    "mask of another aspect ratio": Row(lambda sb: restore.restore(*(lambda i, m: (i, i, sb.t(torch.ones(1, 10, 40))))(*sb.pair())),
                                        InputError, "aspect ratios differ"),
    "3 images, 2 masks": Row(lambda sb: images.image_and_mask(sb.pair(batch=3)[0], sb.pair(batch=2)[1]),
                             InputError, "3 images but 2 masks"),
    "transfer: composite vs harmonized batches": Row(
        lambda sb: transfer.transfer_color(sb.pair(batch=3)[0], sb.t(torch.rand(2, 16, 16, 3)), sb.pair()[1]),
        InputError, "composite holds 3 images but harmonized holds 2"),
    "restore: composite vs harmonized batches": Row(
        lambda sb: restore.restore(sb.t(torch.rand(2, 16, 16, 3)), *sb.pair(batch=3)),
        InputError, "composite holds 3 images but harmonized holds 2"),
    "fit LUT: composite vs harmonized batches": Row(
        lambda sb: lut.fit_lut(sb.pair(batch=3)[0], sb.t(torch.rand(2, 16, 16, 3)), sb.pair()[1], 17),
        InputError, "composite holds 3 images but harmonized holds 2"),
    "metrics: result vs ground-truth batches": Row(
        lambda sb: metrics.image_metrics(sb.t(torch.rand(2, 16, 16, 3)), *sb.pair(batch=3)),
        InputError, "harmonized holds 2 images but ground_truth holds 3"),
    "metrics: result vs ground-truth sizes": Row(
        lambda sb: metrics.image_metrics(sb.t(torch.rand(1, 40, 40, 3)), *sb.pair(48, 64), size=None),
        InputError, "the harmonized image is 40x40 but the ground truth is 64x48"),
    "uint8 IMAGE": Row(_uint8_image_is_scaled, check=_check_scaled, warns="divided by 255"),
    "uint8 MASK noise 3/255": Row(_uint8_mask_noise, warns="divided by 255",
                                  check=lambda r, sb: torch.testing.assert_close(r, torch.full((1, 8, 8), 3 / 255))),
    "int64 IMAGE": Row(lambda sb: images.image_batch(sb.t(torch.ones(1, 4, 4, 3, dtype=torch.int64))),
                       InputError, "expected a float IMAGE in 0..1 (or uint8 0..255)"),
    "NaN in IMAGE": Row(lambda sb: images.image_batch(sb.t(torch.full((1, 4, 4, 3), float("nan")))),
                        InputError, "NaN or infinite"),
    "empty IMAGE": Row(lambda sb: images.image_batch(sb.t(torch.zeros(1, 0, 4, 3))), InputError, "is empty"),
    "5-channel IMAGE": Row(lambda sb: images.image_batch(sb.t(torch.zeros(1, 4, 4, 5))), InputError,
                           "1 (grey), 3 (RGB) or 4 (RGBA) channels"),
    "IMAGE without batch or channels": Row(lambda sb: images.image_batch(sb.t(torch.zeros(4, 4))), InputError,
                                           "[B,H,W,C]"),
    "MASK given as numpy": Row(lambda sb: images.mask_batch(np.ones((4, 4)), 4, 4), InputError, "must be a torch tensor"),
    "empty mask (DiffHarmony)": Row(_empty_mask_diffharmony, warns="selects no pixel",
                                    check=lambda r, sb: torch.testing.assert_close(r[0], r[1], rtol=0, atol=0)),
    "feather wider than the object": Row(_feather_wider_than_object, warns="clamped", check=_check_feather_clamped),
    "grey and RGBA IMAGEs": Row(_grey_and_rgba, check=lambda r, sb: [x.shape[-1] for x in r] == [3, 3]),
    "size not a multiple of 8": Row(_odd_size_restore, check=lambda r, sb: r.shape == (1, 77, 101, 3)),
    "LUT fit on an empty mask": Row(lambda sb: lut.fit_lut(sb.pair()[0], sb.t(torch.rand(1, 16, 16, 3)),
                                                           sb.t(torch.zeros(1, 48, 64)), 17),
                                    InputError, "selects no pixel"),
    "LUT size 1": Row(lambda sb: lut.fit_lut(*(lambda i, m: (i, i, m))(*sb.pair()), size=1), InputError, "LUT size"),
    "LUT smoothness 0": Row(lambda sb: lut.fit_lut(*(lambda i, m: (i, i, m))(*sb.pair()), 17, 0.0), InputError,
                            "smoothness must be > 0"),
    "transfer fit_long_side 4": Row(lambda sb: transfer.transfer_color(*(lambda i, m: (i, i, m))(*sb.pair()),
                                                                       fit_long_side=4), InputError, ">= 8"),
    "restore detail 'sharp'": Row(lambda sb: restore.restore(*(lambda i, m: (i, i, m))(*sb.pair()), detail="sharp"),
                                  InputError, "detail must be one of"),
    "sampler steps 0": Row(lambda sb: dh.sample(dh.load_diffharmony(sb.models / "diffusers" / "tiny-inpaint"),
                                                sb.t(torch.zeros(1, 4, 4, 4)), sb.t(torch.ones(1, 4, 4)), steps=0),
                           InputError, "steps must be >= 1"),
    "resolution 100 (not a multiple of 8)": Row(lambda sb: images.fit_size(64, 64, 100), InputError,
                                                "positive multiple of 8"),
    "refine resolution 100": Row(lambda sb: rf.refine(rf.load_refiner(dh_model(sb) / "refinement"),
                                                      sb.pair()[0], *sb.pair(), 100),
                                 InputError, "multiple of 16"),
    # ---- LUT files
    "LUT prefix '.'": Row(lambda sb: _save_lut(sb, "."), InputError, "names no file"),
    "LUT prefix 'a/..'": Row(lambda sb: _save_lut(sb, "a/.."), InputError, "names no file"),
    "LUT prefix '../x'": Row(lambda sb: _save_lut(sb, "../x"), InputError, "leads out of the output folder"),
    "LUT prefix absolute": Row(lambda sb: _save_lut(sb, "/tmp/x"), InputError, "relative name"),
    "LUT prefix through a symlink out": Row(_lut_through_symlink, InputError, "symbolic link"),
    "LUT never overwrites": Row(_lut_never_overwrites,
                                check=lambda r, sb: r[0] != r[1] and r[2] == r[3] and r[1].endswith("_1.cube")),
    "1D .cube": Row(lambda sb: lut.parse_cube("LUT_1D_SIZE 4\n0 0 0\n"), InputError, "1D LUT"),
    ".cube with missing lines": Row(lambda sb: lut.parse_cube("LUT_3D_SIZE 2\n0 0 0\n"), InputError, "needs 8 table lines"),
    ".cube not found": Row(lambda sb: lut.read_cube(str(sb.inp / "none.cube")), InputError, "not found"),
    # ---- image files
    "16-bit grey composite": Row(lambda sb: _sixteen_bit(sb, 32768),
                                 check=lambda r, sb: torch.testing.assert_close(r[0], torch.full((8, 8, 3), 32768 / 65535))),
    "16-bit mask 300/65535": Row(lambda sb: _sixteen_bit(sb, 300),
                                 check=lambda r, sb: torch.testing.assert_close(r[1], torch.full((8, 8), 300 / 65535))),
    "RGBA cut-out as the mask file": Row(_rgba_cutout_mask,
                                         check=lambda r, sb: abs(float((r >= 0.5).float().mean()) - 0.15) < 1e-6),
    "float TIFF in 0..1": Row(lambda sb: _float_tiff(sb, 1.0), check=lambda r, sb: float(r.max()) == 1.0),
    "float TIFF in 0..255": Row(lambda sb: _float_tiff(sb, 255.0), warns="divided by 255",
                                check=lambda r, sb: float(r.max()) == 1.0),
    "corrupt PNG": Row(_corrupt_png, InputError, "cannot read image"),
    "missing image file": Row(lambda sb: image_io.read_image(sb.inp / "absent.png"), InputError, "not found"),
    # ---- weights
    "pickle that runs code": Row(_pickle_file, WeightsError, UNSAFE),
    "pickle in the unet (diffusers)": Row(lambda sb: _pickle_in_unet(sb, "unet"), WeightsError, UNSAFE),
    "pickle in the text encoder (transformers)": Row(lambda sb: _pickle_in_unet(sb, "text_encoder"), WeightsError, UNSAFE),
    "garbage .safetensors": Row(lambda sb: (sb.inp / "g.safetensors").write_bytes(b"\0" * 64) and
                                load_state_dict(sb.inp / "g.safetensors"), WeightsError, "corrupt"),
    "weights file of unknown type": Row(lambda sb: (sb.inp / "w.onnx").write_bytes(b"x") and
                                        load_state_dict(sb.inp / "w.onnx"), WeightsError, "unsupported weights file type"),
    "unreadable weights file": Row(_unreadable_weights, WeightsError, "permission denied"),
    "corrupt scheduler_config.json": Row(_bad_scheduler_config, WeightsError, "scheduler_config.json (model "),
    "missing model folder": Row(lambda sb: dh.load_diffharmony(sb.inp / "nope"), WeightsError, "not found"),
    "text-to-image UNet for DiffHarmony": Row(lambda sb: dh.load_diffharmony(sb.models / "diffusers" / "tiny-txt2img"),
                                              WeightsError, "in_channels=9"),
    # ---- command line (user errors: one line on stderr, exit 2, before any work)
    "CLI: output parent is a file": Row(lambda sb: ((sb.out.mkdir(), (sb.out / "f").write_text("x")) and
                                                    color_match_cli(sb, "-o", sb.out / "f" / "x.png")),
                                        check=exits(2, "is a file")),
    "CLI: output extension .xyz": Row(lambda sb: color_match_cli(sb, "-o", sb.out / "r.xyz"),
                                      check=exits(2, ".xyz is not an image format")),
    "CLI: output folder not writable": Row(
        lambda sb: (sb.monkeypatch.setattr(cli.os, "access", lambda p, m: False),
                    color_match_cli(sb, "-o", sb.out / "r.png"))[1], check=exits(2, "is not writable")),
    "CLI: seed 2**64": Row(lambda sb: color_match_cli(sb, "-o", sb.out / "r.png", "--seed", 2**64),
                           check=exits(2, "--seed 18446744073709551616 is out of range")),
    "CLI: steps 5000": Row(lambda sb: run_cli(dh_model(sb), *cli_pair(sb), "-o", sb.out / "r.png", "--steps", 5000,
                                              "--scheduler", "ddim"), check=exits(2, "--steps 5000 is out of range")),
    "CLI: resolution 100000": Row(lambda sb: run_cli(dh_model(sb), *cli_pair(sb), "-o", sb.out / "r.png",
                                                     "--resolution", 100000), check=exits(2, "--resolution 100000")),
    "CLI: device that does not exist": Row(lambda sb: color_match_cli(sb, "-o", sb.out / "r.png", "--device", "tpu"),
                                           check=exits(2, "--device 'tpu' is not a device")),
    "CLI: mask of another aspect ratio": Row(lambda sb: run_cli(dh_model(sb), *cli_pair(sb, mask_h=20), "-o",
                                                                sb.out / "r.png"), check=exits(2, "expected a mask of the composite's size")),
    "CLI: missing composite": Row(lambda sb: run_cli("--method", "color-match", sb.inp / "no.png", sb.inp / "no.png",
                                                     "-o", sb.out / "r.png"), check=exits(2, "not found")),
    "CLI: missing model": Row(lambda sb: run_cli(sb.inp / "none", *cli_pair(sb), "-o", sb.out / "r.png"),
                              check=exits(2, "model not found")),
    "CLI: folder re-run skips finished images": Row(_folder_rerun, check=_check_rerun),
    # ---- benchmark
    "benchmark --max-side 0": Row(lambda sb: bench_cli.parse_args(_benchmark(sb, "--max-side", "0")[1]), SystemExit),
    "dataset max_side 0 (training, benchmark)": Row(
        lambda sb: ihd.load_sample(ihd.list_split(_benchmark(sb)[0], "test", "HFlickr", limit=1)[0], 0),
        InputError, "max_side 0"),
    "benchmark: failed save leaves no row": Row(_benchmark_failed_save, check=_check_failed_save),
    "benchmark: resume recomputes a missing image": Row(
        _benchmark_resume_missing_image, check=lambda r, sb: (r[1] == [r[0]] and r[2])),
    # ---- VLM requests and secrets
    "Ollama URL with user:password": Row(lambda sb: _refused_url(sb, "http://user:s3cretpw@127.0.0.1:11434"),
                                         check=_no_secret("s3cretpw")),
    "Ollama URL with ?api_key=": Row(lambda sb: _refused_url(sb, "http://127.0.0.1:11434/?api_key=k3yvalue"),
                                     check=_no_secret("k3yvalue")),
    "Gemini endpoint with ?key=": Row(lambda sb: _refused_url(sb, "https://proxy.example/v1?key=k3yvalue", "gemini"),
                                      check=_no_secret("k3yvalue")),
    "Ollama unreachable": Row(lambda sb: _ollama_unreachable(sb, "http://127.0.0.1:{port}"),
                              check=lambda r, sb: "cannot reach Ollama at http://127.0.0.1:" in r[0]),
    "provider error body with the key": Row(_provider_error_body,
                                            check=_no_secret("AIzaSyTESTKEY123456", "other-secret-value", "abc123")),
    "VLM URL without http": Row(lambda sb: vlm.make_backend("ollama", url="ftp://host"), InputError, "http://host:port"),
    "VLM timeout 0": Row(lambda sb: vlm.make_backend("ollama", timeout=0), InputError, "timeout must be positive"),
}

def _looping_models(sb):
    """A models root whose folders hold links back to the root, to themselves and to each other (the walker
    in pipelines/core/model_files.py; its own tests are in tests/core/test_model_files.py)."""
    root = sb.inp / "models"
    for kind in ("diffharmony", "pidinet", "LLM"):
        (root / kind).mkdir(parents=True)
        (root / kind / "to_models").symlink_to(root, target_is_directory=True)
        (root / kind / "self").symlink_to(root / kind, target_is_directory=True)
        os.symlink("pong", root / kind / "ping")
        os.symlink("ping", root / kind / "pong")
    (root / "diffharmony" / "DiffHarmony").symlink_to(dh_model(sb), target_is_directory=True)
    (root / "pidinet" / "table5_pidinet.pth").write_bytes(b"x")
    sb.monkeypatch.setenv("HARMONIZE_MODELS_DIR", str(root))
    from comfyui_harmonize.nodes import host
    from comfyui_harmonize.pipelines.edges import pidinet

    return (sorted(host.sd_model_choices(("diffharmony",))),
            sorted(rf.find_refiners(host.model_roots("diffharmony"))),
            sorted(pidinet.find_checkpoints(host.model_roots("pidinet"))),
            sorted(vlm.local_models(host.model_roots("LLM"))))


HANGS = {  # rows that hung (or took minutes) before: bounded by the runner
    "symlink loops in the model folders": Row(_looping_models, check=lambda r, sb: r == (
        ["diffharmony/DiffHarmony"], ["DiffHarmony/refinement"], ["table5_pidinet.pth"], [])),
    "feather 256 at 800x600": Row(_feather_large_radius, check=lambda r, sb: float(r.max()) == 1.0),
    "Ollama server that never answers": Row(_ollama_hangs, vlm.BackendError, "gave no answer within 1 s"),
}


def _params():
    for name, row in ROWS.items():
        yield pytest.param(row, id=name)
    for name, row in HANGS.items():
        yield pytest.param(row, id=name, marks=pytest.mark.timeout(120))


def test_the_table_has_at_least_50_rows():
    assert len(ROWS) + len(HANGS) >= 50


@pytest.mark.parametrize("row", list(_params()))
def test_bad_input(row: Row, tmp_path, models_root, monkeypatch):
    sb = Sandbox(tmp_path / "sandbox", models_root, monkeypatch)
    sb.inp.mkdir(parents=True)
    monkeypatch.chdir(sb.root)
    monkeypatch.setenv("HARMONIZE_OUTPUT_DIR", str(sb.out))
    outside_before = snapshot(sb.root, models_root, skip=sb.out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if row.raises is not None:
            with pytest.raises(row.raises) as err:
                row.run(sb)
            if row.match is not None:
                assert row.match in str(err.value), str(err.value)
            result = err.value
        else:
            result = row.run(sb)
    if row.warns is not None:
        assert any(row.warns in str(w.message) for w in caught), [str(w.message) for w in caught]
    if row.check is not None:
        assert row.check(result, sb) in (None, True)  # a check returns True or asserts itself
    for given, copy in sb.tensors:
        assert torch.equal(given, copy) or (given.isnan().all() and copy.isnan().all()), "an input was modified"
    # nothing outside the output folder was created or changed (inputs the row itself wrote are in inputs/)
    outside_after = snapshot(sb.root, models_root, skip=sb.out)
    changed = {p for p in outside_after if outside_before.get(p) != outside_after[p]}
    assert all(Path(p).is_relative_to(sb.inp) for p in changed), sorted(changed)
