"""Global 3D LUTs (pipelines/color/lut.py): fitting on real photographs, applying, .cube export/import."""
from __future__ import annotations

import os

import pytest
import torch

from comfyui_harmonize.pipelines.core import images
from comfyui_harmonize.pipelines.color import lut as L
from comfyui_harmonize.pipelines.core.errors import InputError


def photo(name: str) -> torch.Tensor:
    skdata = pytest.importorskip("skimage.data", reason="scikit-image (test extra) ships the sample photos")
    return torch.from_numpy(getattr(skdata, name)().copy()).float()[None] / 255.0


def ellipse_mask(h, w):
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return ((((yy - 0.55 * h) / (0.38 * h)) ** 2 + ((xx - 0.5 * w) / (0.32 * w)) ** 2) < 1).float()[None]


def affine_change(x):
    """Maps the unit cube into itself (no clipping): exactly representable by any LUT."""
    mix = torch.tensor([[0.8, 0.1, 0.0], [0.05, 0.75, 0.1], [0.0, 0.1, 0.7]])
    return x @ mix.T + torch.tensor([0.05, 0.05, 0.15])


def curve_change(x):
    """A nonlinear global grade: channel mixing, gains and a gamma (a tone curve)."""
    mix = torch.tensor([[0.9, 0.1, 0.0], [0.05, 0.8, 0.1], [0.0, 0.15, 0.7]])
    y = (x @ mix.T) * torch.tensor([1.1, 0.95, 0.8]) + torch.tensor([0.02, 0.0, 0.05])
    return y.clamp(0, 1) ** 0.8


def reference_trilinear(table: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """Plain trilinear interpolation of a [N(b),N(g),N(r),3] lattice at colors [n,3] in 0..1."""
    n = table.shape[0]
    p = rgb.double().clamp(0, 1) * (n - 1)
    i0 = p.floor().long().clamp(max=n - 2)
    f = p - i0
    out = torch.zeros(rgb.shape[0], 3, dtype=torch.float64)
    for dr in (0, 1):
        for dg in (0, 1):
            for db in (0, 1):
                w = ((f[:, 0] if dr else 1 - f[:, 0]) * (f[:, 1] if dg else 1 - f[:, 1])
                     * (f[:, 2] if db else 1 - f[:, 2]))
                node = table[i0[:, 2] + db, i0[:, 1] + dg, i0[:, 0] + dr].double()
                out += w[:, None] * node
    return out



# ------------------------------------------------------------------------------------------ fitting
@pytest.mark.parametrize("size", [17, 33])
def test_lut_reproduces_a_global_grade_on_a_real_photo(size):
    """Fitted on the foreground of a real photo and its graded version, the LUT applied to the full image
    reproduces the grade on the foreground (the colors it was fitted on)."""
    gt = photo("astronaut")
    mask = ellipse_mask(512, 512)
    graded = curve_change(gt)
    lut = L.fit_lut(gt, graded, mask, size=size)
    out = L.apply_lut(gt, lut)
    inside = mask[0] > 0.5
    err = (out[0][inside] - graded[0][inside]).abs()
    assert err.mean() < 2e-3 and err.max() < 0.05, (size, float(err.mean()), float(err.max()))
    assert lut.info["rmse"] < 3e-3


def test_affine_grade_is_exact_everywhere_even_where_the_foreground_has_no_colors():
    """Colors the foreground lacks are filled by the smoothness term, which penalises only the deviation
    from the global affine fit: an affine grade is therefore reproduced over the whole cube, not only on
    the fitted colors."""
    gt = photo("coffee")
    mask = ellipse_mask(400, 600)
    lut = L.fit_lut(gt, affine_change(gt), mask, size=17)
    torch.manual_seed(0)
    anywhere = torch.rand(20000, 3)
    err = (L.lookup(anywhere, lut) - affine_change(anywhere)).abs().max()
    assert err < 1e-4, float(err)


def test_empty_cells_are_filled_smoothly_and_within_range():
    gt = photo("astronaut")
    mask = ellipse_mask(512, 512)
    lut = L.fit_lut(gt, curve_change(gt), mask, size=33)
    t = lut.table.double()
    assert torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1
    # a smooth grade: neighbouring nodes differ by a bounded step everywhere in the cube
    steps = max(float(t.diff(dim=d).abs().max()) for d in range(3))
    assert steps < 0.15, steps
    # the fit is mostly data-free: the astronaut's foreground occupies a small part of the cube
    occupied = torch.unique(L._trilinear(images.resize_images(gt, (128, 128)).reshape(-1, 3).double(), 33)[0])
    assert occupied.numel() < 0.2 * 32 ** 3


def test_single_color_foreground_gives_a_finite_lut_that_maps_that_color():
    img = torch.full((1, 16, 16, 3), 0.3)
    img[..., 2] = 0.6
    target = torch.tensor([0.5, 0.4, 0.2]).expand(1, 16, 16, 3)
    lut = L.fit_lut(img, target, torch.ones(1, 16, 16), size=17)
    assert torch.isfinite(lut.table).all()
    assert torch.allclose(L.lookup(torch.tensor([[0.3, 0.3, 0.6]]), lut), target[0, :1, 0], atol=1e-3)


def test_lut_sequence_recovers_each_iteration_step():
    gt = photo("coffee")[:, ::2, ::2]
    mask = ellipse_mask(200, 300)
    f1 = affine_change(gt)
    f2 = f1 ** 0.9
    frames = torch.cat([gt, f1, f2])
    luts = L.fit_lut_sequence(frames, mask, size=17)
    assert len(luts) == 2 and all(lut.size == 17 for lut in luts)
    inside = mask[0] > 0.5
    for k, lut in enumerate(luts):
        err = (L.apply_lut(frames[k:k + 1], lut)[0][inside] - frames[k + 1][inside]).abs()
        assert err.mean() < 2e-3, (k, float(err.mean()))
    with pytest.raises(InputError, match="at least 2 frames"):
        L.fit_lut_sequence(gt, mask)


def test_fit_is_deterministic_and_leaves_inputs_untouched():
    gt = photo("coffee")[:, ::4, ::4]
    mask = ellipse_mask(100, 150)
    graded = curve_change(gt)
    keep = (gt.clone(), graded.clone(), mask.clone())
    a = L.fit_lut(gt, graded, mask, size=17)
    b = L.fit_lut(gt, graded, mask, size=17)
    assert torch.equal(a.table, b.table)
    assert torch.equal(gt, keep[0]) and torch.equal(graded, keep[1]) and torch.equal(mask, keep[2])


def test_fit_errors():
    img = torch.rand(1, 32, 32, 3)
    with pytest.raises(InputError, match="selects no pixel"):
        L.fit_lut(img, img, torch.zeros(1, 32, 32))
    with pytest.raises(InputError, match="LUT size"):
        L.fit_lut(img, img, torch.ones(1, 32, 32), size=1)
    with pytest.raises(InputError, match="aspect"):
        L.fit_lut(img, img, torch.ones(1, 16, 40))


# ------------------------------------------------------------------------------------------ applying
def test_apply_matches_plain_trilinear_interpolation():
    torch.manual_seed(0)
    table = torch.rand(9, 9, 9, 3)
    lut = L.Lut3D(table)
    rgb = torch.rand(5000, 3)
    rgb[:10] = torch.tensor([0.0, 1.0, 0.5])  # faces and corners of the cube
    assert torch.allclose(L.lookup(rgb, lut).double(), reference_trilinear(table, rgb), atol=1e-5)
    image = rgb.reshape(1, 50, 100, 3)
    out = L.apply_lut(image, lut, strip_pixels=700)  # strips of 7 rows
    assert torch.allclose(out.reshape(-1, 3).double(), reference_trilinear(table, rgb).clamp(0, 1), atol=1e-5)


def test_identity_lut_and_masked_apply_keep_pixels():
    gt = photo("coffee")[:, ::4, ::4]
    ident = L.Lut3D(L.identity_table(17).float())
    assert torch.allclose(L.apply_lut(gt, ident), gt, atol=1e-6)
    graded = L.Lut3D(L.identity_table(17).float() ** 2)
    mask = ellipse_mask(100, 150)
    out = L.apply_lut(gt, graded, mask)
    outside = mask[0] == 0
    assert torch.equal(out[0][outside], gt[0][outside])
    inside = mask[0] == 1
    assert torch.allclose(out[0][inside], gt[0][inside] ** 2, atol=0.01)


def test_domain_is_honoured():
    table = L.identity_table(5).float() * 2 - 0.5  # maps -0.5..1.5 onto itself
    lut = L.Lut3D(table, (-0.5, -0.5, -0.5), (1.5, 1.5, 1.5))
    rgb = torch.tensor([[0.25, 0.5, 0.75]])
    assert torch.allclose(L.lookup(rgb, lut), rgb, atol=1e-6)


# ------------------------------------------------------------------------------------------- .cube
def test_cube_round_trip_and_spec_layout(tmp_path):
    torch.manual_seed(0)
    table = torch.rand(3, 3, 3, 3)
    lut = L.Lut3D(table, title='My "look"\nv2')
    path = L.write_cube(lut, str(tmp_path / "look.cube"))
    lines = [ln for ln in open(path, encoding="ascii").read().splitlines() if ln and not ln.startswith("#")]
    assert lines[:4] == ["TITLE \"My 'look' v2\"", "LUT_3D_SIZE 3", "DOMAIN_MIN 0.000000 0.000000 0.000000",
                         "DOMAIN_MAX 1.000000 1.000000 1.000000"]
    data = [[float(v) for v in ln.split()] for ln in lines[4:]]
    assert len(data) == 27
    # red changes fastest, then green, then blue: line r + 3 g + 9 b holds the output for input (r, g, b)
    for r, g, b in [(1, 0, 0), (0, 1, 0), (0, 0, 1), (2, 1, 0), (1, 2, 2)]:
        assert data[r + 3 * g + 9 * b] == pytest.approx(table[b, g, r].tolist(), abs=1e-6)
    back = L.read_cube(path)
    assert back.size == 3 and back.title == "My 'look' v2"
    assert back.domain_min == (0.0, 0.0, 0.0) and back.domain_max == (1.0, 1.0, 1.0)
    assert torch.allclose(back.table, table, atol=1e-6)


def test_identity_cube_known_entries(tmp_path):
    """The spec's defining example: in an identity LUT the second data line is (1/(N-1), 0, 0), line N is
    (0, 1/(N-1), 0) and line N^2 is (0, 0, 1/(N-1))."""
    n = 5
    text = L.format_cube(L.Lut3D(L.identity_table(n).float()))
    data = [ln for ln in text.splitlines() if ln[:1].isdigit()]
    assert len(data) == n ** 3
    assert data[1] == "0.250000 0.000000 0.000000"
    assert data[n] == "0.000000 0.250000 0.000000"
    assert data[n * n] == "0.000000 0.000000 0.250000"
    assert data[-1] == "1.000000 1.000000 1.000000"


def test_fitted_65_lut_survives_the_file_and_an_independent_reader(tmp_path):
    """A fitted 65^3 LUT written to .cube, read back by us and by pillow-lut (an independent parser), and
    applied by Pillow's own trilinear Color3DLUT filter gives the same image as our apply_lut."""
    gt = photo("astronaut")[:, ::4, ::4]
    mask = ellipse_mask(128, 128)
    lut = L.fit_lut(gt, curve_change(gt), mask, size=65)
    path = L.write_cube(lut, str(tmp_path / "grade.cube"))
    back = L.read_cube(path)
    assert back.size == 65 and torch.allclose(back.table, lut.table, atol=1e-6)
    pillow_lut = pytest.importorskip("pillow_lut", reason="pillow-lut (test extra) is the independent reader")
    from PIL import Image

    img8 = (gt[0] * 255).round().to(torch.uint8)
    theirs = Image.fromarray(img8.numpy()).filter(pillow_lut.load_cube_file(path))
    theirs = torch.from_numpy(__import__("numpy").asarray(theirs).copy()).float() / 255
    ours = L.apply_lut(img8.float()[None] / 255, back)[0]
    assert (theirs - ours).abs().max() <= 2.5 / 255, float((theirs - ours).abs().max() * 255)


def test_write_never_overwrites(tmp_path):
    lut = L.Lut3D(L.identity_table(3).float())
    first = L.write_cube(lut, str(tmp_path / "a.cube"))
    before = open(first, "rb").read()
    other = L.Lut3D(L.identity_table(3).float() * 0.5)
    second = L.write_cube(other, str(tmp_path / "a.cube"))
    third = L.write_cube(other, str(tmp_path / "a"))  # suffix added
    assert len({first, second, third}) == 3
    assert open(first, "rb").read() == before
    assert torch.allclose(L.read_cube(second).table, other.table)
    assert sorted(os.listdir(tmp_path)) == ["a.cube", "a_1.cube", "a_2.cube"]


def test_parse_reads_comments_resolve_range_and_rejects_bad_files():
    good = "# a comment\n\nTITLE \"x\"\nLUT_3D_INPUT_RANGE 0.0 2.0\nLUT_3D_SIZE 2\n" + "\n".join(
        f"{r} {g} {b}" for b in (0, 2) for g in (0, 2) for r in (0, 2)) + "\n"
    lut = L.parse_cube(good)
    assert lut.domain_max == (2.0, 2.0, 2.0) and torch.equal(lut.table[1, 0, 1], torch.tensor([2.0, 0.0, 2.0]))
    bad = {
        "LUT_3D_SIZE 2\n0 0 0\n": "needs 8 table lines",
        "LUT_1D_SIZE 4\n": "1D LUT",
        "LUT_3D_SIZE 2\n" + "0 0 x\n" * 8: "expects 3 numbers",
        "0 0 0\n": "before LUT_3D_SIZE",
        "TITLE \"t\"\n": "no LUT_3D_SIZE",
        "LUT_3D_SIZE 1\n": "must be 2",
        "FOO 1\n": "unknown keyword",
        "LUT_3D_SIZE 2\nDOMAIN_MIN 1 1 1\nDOMAIN_MAX 0 0 0\n" + "0 0 0\n" * 8: "min < max",
    }
    for text, message in bad.items():
        with pytest.raises(InputError, match=message):
            L.parse_cube(text, "t.cube")


def test_cube_path_stays_inside_the_output_folder(tmp_path):
    assert L.cube_path(str(tmp_path), "harmonize/look") == str(tmp_path / "harmonize" / "look.cube")
    for bad in ["../escape", "/abs/path", "", "a/../../b"]:
        with pytest.raises(InputError):
            L.cube_path(str(tmp_path), bad)


# ---------------------------------------------------------------------------------------------- nodes
def test_lut_nodes_fit_save_apply_and_sequence(tmp_path, monkeypatch):
    from comfyui_harmonize.nodes import host
    from comfyui_harmonize.nodes.color import NODE_CLASS_MAPPINGS as nodes

    monkeypatch.setenv(host.OUTPUT_ENV, str(tmp_path))
    monkeypatch.setattr(host, "_comfy", lambda name: None)  # outside ComfyUI even if one is importable
    for cls in nodes.values():
        spec = cls.INPUT_TYPES()
        assert cls.DESCRIPTION and cls.CATEGORY.startswith("harmonize/")
        assert all("tooltip" in o for group in spec.values() for _, o in group.values())
    gt = photo("coffee")[:, ::4, ::4]
    mask = ellipse_mask(100, 150)
    graded = curve_change(gt)
    lut, preview = nodes["HarmonizeFitLUT"]().run(gt, graded, mask, "17")
    assert isinstance(lut, L.Lut3D) and lut.size == 17 and preview.shape == gt.shape
    assert torch.equal(preview, L.apply_lut(gt, lut, mask))
    saved = nodes["HarmonizeSaveLUT"]().run(lut, "looks/grade")
    again = nodes["HarmonizeSaveLUT"]().run(lut, "looks/grade")
    assert saved["ui"]["text"] == [os.path.join("looks", "grade.cube")] and saved["result"] == (saved["ui"]["text"][0],)
    assert again["result"][0] == os.path.join("looks", "grade_1.cube")
    assert torch.allclose(L.read_cube(str(tmp_path / "looks" / "grade.cube")).table, lut.table, atol=1e-6)
    (applied,) = nodes["HarmonizeApplyLUT"]().run(gt, lut, 0, mask)
    assert torch.equal(applied, preview)
    seq = nodes["HarmonizeLUTSequence"]().run(torch.cat([gt, graded, graded ** 1.2]), mask, "17", "steps")
    assert seq["ui"]["text"] == ["steps_000-001.cube", "steps_001-002.cube"]
    assert all((tmp_path / name).is_file() for name in seq["ui"]["text"])
