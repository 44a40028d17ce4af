"""PiDiNet (published checkpoints, differentiable pixel-difference convolutions), Sobel edges, the masked
edge loss of zero-shot harmonization (Eq. 5-6) and the PiDiNet / edge-map nodes."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comfyui_harmonize.nodes import edges as pidinet_nodes
from comfyui_harmonize.pipelines.edges import loss as edges, pidinet
from comfyui_harmonize.pipelines.core.errors import InputError, WeightsError

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TINY_CKPT = SHARED / "pidinet" / "table5_pidinet-tiny.pth"
CAT = SHARED / "composites" / "cat_composite.png"

VARIANTS = {  # name: (inplane, dilation-module width, spatial attention), as the authors build them
    "tiny": (20, 8, True),
    "small": (30, 12, True),
    "full": (60, 24, True),
    "tiny-l": (20, None, False),
}



def random_pidinet(name: str, seed: int = 0) -> pidinet.PiDiNet:
    inplane, dil, sa = VARIANTS[name]
    torch.manual_seed(seed)
    model = pidinet.PiDiNet(inplane, dil, sa)
    with torch.no_grad():  # non-trivial biases and fusion weights, so the round trip checks every tensor
        for p in model.parameters():
            if p.dim() == 1 or p.shape[:2] == (1, 4):
                p.uniform_(-0.5, 0.5)
    return model.eval().requires_grad_(False)


def save_published(model: pidinet.PiDiNet, path: Path, **extra) -> Path:
    """Write ``model`` in the authors' layout: {"epoch", "state_dict"} with "module." prefixes."""
    state = {"epoch": 19, "state_dict": {f"module.{k}": v.clone() for k, v in model.state_dict().items()}}
    state.update(extra)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> pidinet.PiDiNet:
    """A random tiny PiDiNet loaded through the published layout (frozen, as users get it)."""
    path = save_published(random_pidinet("tiny"), tmp_path_factory.mktemp("pidi") / "tiny.pth")
    return pidinet.load_pidinet(path)


def photo(size=(128, 86)) -> torch.Tensor:
    from PIL import Image

    img = Image.open(CAT).convert("RGB").resize(size, Image.BICUBIC)
    return torch.from_numpy(np.array(img)).float().div(255).permute(2, 0, 1)[None].contiguous()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


# ----------------------------------------------------------------- pixel-difference convolutions
def _shift(xp: torch.Tensor, pad: int, dy: int, dx: int, h: int, w: int) -> torch.Tensor:
    """x[y + dy, x + dx] for every output pixel, from the zero-padded input ``xp``."""
    return xp[..., pad + dy: pad + dy + h, pad + dx: pad + dx + w]


RASTER3 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
CLOCKWISE = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]
RADIAL_OUTER = [(-2, -2), (-2, 0), (-2, 2), (0, -2), (0, 2), (2, -2), (2, 0), (2, 2)]


def reference_pdc(op: str, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Pixel-difference convolution straight from the paper's definitions (zero padding), one
    window position at a time."""
    b, cin, h, w = x.shape
    cout = weight.shape[0]
    xp = F.pad(x, (2, 2, 2, 2))
    wf = weight.reshape(cout, cin // groups, 9)
    out = torch.zeros(b, cout, h, w, dtype=x.dtype)
    for o in range(cout):
        g = o // (cout // groups)
        for ci in range(cin // groups):
            xi = lambda dy, dx: _shift(xp[:, g * (cin // groups) + ci], 2, dy, dx, h, w)  # noqa: E731
            k = wf[o, ci]
            if op == "cv":
                terms = [k[n] * xi(*RASTER3[n]) for n in range(9)]
            elif op == "cd":  # w_i (x_i - x_center)
                terms = [k[n] * (xi(*RASTER3[n]) - xi(0, 0)) for n in range(9)]
            elif op == "ad":  # w_i (x_i - x_clockwise-next(i)) on the ring
                terms = []
                for n, (dy, dx) in enumerate(CLOCKWISE):
                    ny, nx = CLOCKWISE[(n + 1) % 8]
                    terms.append(k[RASTER3.index((dy, dx))] * (xi(dy, dx) - xi(ny, nx)))
            else:  # rd: w_(d+1) (x_outer(d) - x_inner(d)), inner = outer / 2
                terms = [k[d + 1] * (xi(oy, ox) - xi(oy // 2, ox // 2)) for d, (oy, ox) in enumerate(RADIAL_OUTER)]
            out[:, o] += sum(terms)
    return out


@pytest.mark.parametrize("op", ["cv", "cd", "ad", "rd"])
@pytest.mark.parametrize("groups", [1, 3])
def test_pixel_difference_conv_matches_the_definition(op, groups):
    torch.manual_seed(1)
    conv = pidinet.PixelDifferenceConv(op, 3, 6, groups=groups).double()
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    assert torch.allclose(conv(x), reference_pdc(op, x, conv.weight.detach(), groups), atol=1e-12)


@pytest.mark.parametrize("op", ["cd", "ad", "rd"])
def test_pixel_difference_conv_is_differentiable_in_the_input(op):
    torch.manual_seed(2)
    conv = pidinet.PixelDifferenceConv(op, 2, 2, groups=2).double().requires_grad_(False)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(conv, (x,))


# ------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("name", list(VARIANTS))
def test_published_layout_round_trips_each_variant(name, tmp_path):
    model = random_pidinet(name, seed=3)
    path = save_published(model, tmp_path / f"table5_pidinet-{name}.pth")
    loaded = pidinet.load_pidinet(path)
    inplane, dil, sa = VARIANTS[name]
    assert (loaded.inplane, loaded.dil, loaded.sa) == (inplane, dil, sa)
    assert loaded.variant == name
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(2, 3, 24, 37)
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    assert got.shape == (2, 1, 24, 37)
    assert torch.equal(expected, got)


def test_safetensors_without_prefix_loads_too(tmp_path):
    from safetensors.torch import save_file

    model = random_pidinet("tiny", seed=4)
    path = tmp_path / "pidinet_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), pidinet.load_pidinet(path)(x))


@pytest.mark.skipif(not (TINY_CKPT.is_file() and CAT.is_file()),
                    reason="needs ../shared/data (real PiDiNet-tiny weights and a photo)")
def test_real_tiny_checkpoint_sees_the_edges_sobel_sees():
    model = pidinet.load_pidinet(TINY_CKPT)
    assert model.variant == "tiny" and (model.inplane, model.dil, model.sa) == (20, 8, True)
    x = photo()
    with torch.no_grad():
        e = edges.pidinet_edges(model, x)
        s = edges.sobel_edges(x).mean(1, keepdim=True)
        untrained = edges.pidinet_edges(random_pidinet("tiny", seed=5), x)
    assert e.shape == (1, 1, 86, 128)
    assert float(e.min()) > 0 and float(e.max()) < 1
    r_trained, r_untrained = pearson(e, s), pearson(untrained, s)
    # measured: trained 0.45 at this size (0.43-0.50 from 96 to 192 px wide), untrained about -0.3
    assert r_trained > 0.3, r_trained
    assert r_untrained < r_trained - 0.3, (r_untrained, r_trained)


def test_checkpoint_with_code_is_refused(tmp_path):
    path = save_published(random_pidinet("tiny"), tmp_path / "with_args.pth", args=argparse.Namespace(config="carv4"))
    with pytest.raises(WeightsError, match="refused") as err:
        pidinet.load_pidinet(path)
    assert str(path) in str(err.value)


def test_wrong_files_give_clear_errors(tmp_path):
    other = tmp_path / "other_model.pth"
    torch.save({"epoch": 1, "state_dict": {"module.conv.weight": torch.zeros(3, 3, 1, 1)}}, other)
    with pytest.raises(WeightsError, match="not a PiDiNet checkpoint") as err:
        pidinet.load_pidinet(other)
    assert str(other) in str(err.value)

    incomplete = tmp_path / "incomplete.pth"
    state = {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in random_pidinet("tiny").state_dict().items()
                                        if not k.startswith("block3_2")}}
    torch.save(state, incomplete)
    with pytest.raises(WeightsError, match="missing keys") as err:
        pidinet.load_pidinet(incomplete)
    assert str(incomplete) in str(err.value)

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(WeightsError, match="corrupt") as err:
        pidinet.load_pidinet(corrupt)
    assert str(corrupt) in str(err.value)

    with pytest.raises(WeightsError, match="not found"):
        pidinet.load_pidinet(tmp_path / "absent.pth")


# ---------------------------------------------------------------------------------------- Sobel
def reference_sobel(x: torch.Tensor) -> torch.Tensor:
    """sqrt(gx^2 + gy^2 + 1e-6) per channel, Sobel kernels / 8, replicated borders."""
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=x.dtype) / 8
    c = x.shape[1]
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(xp, kx.expand(c, 1, 3, 3), groups=c)
    gy = F.conv2d(xp, kx.t().expand(c, 1, 3, 3), groups=c)
    return torch.sqrt(gx ** 2 + gy ** 2 + 1e-6)


def test_sobel_matches_plain_reference():
    x = torch.rand(2, 3, 11, 14, dtype=torch.float64)
    assert torch.allclose(edges.sobel_edges(x), reference_sobel(x), atol=1e-12)


def test_sobel_properties():
    torch.manual_seed(6)
    x = torch.rand(1, 3, 16, 20)
    e = edges.sobel_edges(x)
    assert e.dtype == torch.float32 and e.shape == x.shape
    # brightness offset does not move edges
    assert torch.allclose(edges.sobel_edges(0.5 * x + 0.1), edges.sobel_edges(0.5 * x + 0.4), atol=1e-6)
    # mirror and transpose equivariant (magnitude, symmetric borders)
    assert torch.allclose(edges.sobel_edges(x.flip(-1)), e.flip(-1), atol=1e-6)
    assert torch.allclose(edges.sobel_edges(x.transpose(-1, -2)), e.transpose(-1, -2), atol=1e-6)
    # flat image: only the epsilon floor
    assert torch.allclose(edges.sobel_edges(torch.full((1, 3, 8, 8), 0.3)), torch.full((1, 3, 8, 8), 1e-3))
    # homogeneous in scale: why both images of a comparison must be on the same range
    far = e > 0.05
    assert torch.allclose(edges.sobel_edges(0.5 * x)[far], 0.5 * e[far], rtol=1e-3)
    # a vertical step edge of height 1 has magnitude 0.5 next to it
    step = torch.zeros(1, 3, 8, 8)
    step[..., 4:] = 1
    assert torch.allclose(edges.sobel_edges(step)[..., 3:5], torch.full((1, 3, 8, 2), math.sqrt(0.25 + 1e-6)))


# ------------------------------------------------------------------------------------ edge loss
def test_loss_is_zero_for_identical_images(tiny_model):
    x = torch.rand(1, 3, 32, 40)
    mask = torch.zeros(1, 32, 40)
    mask[:, 8:24, 10:30] = 1
    ref = edges.reference_edges(x, tiny_model)
    assert float(edges.edge_loss(x.clone(), ref, mask, tiny_model)) == 0.0
    assert float(edges.edge_loss(x.clone(), x, mask, tiny_model)) == 0.0


def test_gradients_flow_through_both_terms(tiny_model):
    torch.manual_seed(7)
    ref_img = torch.rand(1, 3, 32, 40)
    mask = torch.zeros(1, 32, 40)
    mask[:, 6:26, 8:32] = 1
    ref = edges.reference_edges(ref_img, tiny_model)
    assert not ref.sobel.requires_grad and not ref.pidinet.requires_grad
    base = (ref_img + 0.2 * torch.randn_like(ref_img)).clamp(0, 1)

    grads = []
    for pick in (0, 1):
        img = base.clone().requires_grad_(True)
        term = edges.edge_terms(img, ref, mask, tiny_model)[pick]
        assert float(term.detach()) > 0
        term.backward()
        assert torch.isfinite(img.grad).all()
        grads.append(img.grad)
    assert grads[0].abs().sum() > 0, "Sobel term has no gradient"
    assert grads[1].abs().sum() > 0, "PiDiNet term has no gradient"
    assert not torch.allclose(grads[0], grads[1])

    img = base.clone().requires_grad_(True)
    loss = edges.edge_loss(img, ref, mask, tiny_model, gamma=0.1)
    loss.backward()
    assert torch.allclose(img.grad, grads[0] + 0.1 * grads[1], atol=1e-7)
    assert all(p.grad is None for p in tiny_model.parameters())


def test_loss_gradient_matches_finite_differences(tiny_model):
    torch.manual_seed(8)
    model = pidinet.pidinet_from_state_dict(tiny_model.state_dict()).double()
    ref = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    mask = torch.zeros(1, 8, 8, dtype=torch.float64)
    mask[:, 2:7, 1:6] = 1
    edge_ref = edges.reference_edges(ref, model)
    img = (ref + 0.1 * torch.randn_like(ref)).clamp(0.05, 0.95).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda i: edges.edge_loss(i, edge_ref, mask, model, gamma=0.5), (img,))


def test_loss_normalisation_is_mean_over_mask_pixels():
    torch.manual_seed(9)
    a, b = torch.rand(1, 3, 12, 16), torch.rand(1, 3, 12, 16)
    mask = torch.zeros(1, 12, 16)
    mask[:, 2:9, 3:11] = 1
    d2 = (reference_sobel(a) - reference_sobel(b)) ** 2
    expected = d2.mean(1)[mask.bool()].mean()
    got = edges.edge_loss(a, b, mask)
    assert torch.allclose(got, expected, rtol=1e-5)
    # the official MSELoss(E * m, E' * m) is the same up to the masked fraction of the image
    official = F.mse_loss(reference_sobel(a) * mask[:, None], reference_sobel(b) * mask[:, None])
    assert torch.allclose(official, got * mask.mean(), rtol=1e-5)
    # a batch is the mean of its images; one mask and one reference broadcast over it
    ab = torch.cat([a, b])
    both = edges.edge_loss(ab, b, mask)
    assert torch.allclose(both, got / 2, rtol=1e-5)
    # empty mask: nothing to constrain
    assert float(edges.edge_loss(a, b, torch.zeros(1, 12, 16))) == 0.0


def test_only_the_masked_region_counts(tiny_model):
    torch.manual_seed(10)
    h, w = 16, 256
    ref = torch.rand(1, 3, h, w)
    mask = torch.zeros(1, h, w)
    mask[:, :, :24] = 1
    img = ref.roll(1, dims=-1)
    ref_edges = edges.reference_edges(ref, tiny_model)
    loss = edges.edge_loss(img, ref_edges, mask, tiny_model)

    far = img.clone()
    far[..., 224:] = torch.rand(1, 3, h, 32)  # 200 px from the mask: beyond PiDiNet's receptive field (~180)
    assert torch.allclose(edges.edge_loss(far, ref_edges, mask, tiny_model), loss, rtol=1e-6, atol=0)

    near = img.clone()
    near[..., 4:20] = torch.rand(1, 3, h, 16)
    assert not torch.allclose(edges.edge_loss(near, ref_edges, mask, tiny_model), loss, rtol=1e-3)


def test_bad_inputs_are_clear_errors(tiny_model):
    x = torch.rand(1, 3, 16, 16)
    mask = torch.ones(1, 16, 16)
    with pytest.raises(InputError, match=r"\[0,1\]"):
        edges.edge_loss(x * 2 - 1, x, mask)
    with pytest.raises(InputError, match=r"\[B,3,H,W\]"):
        edges.edge_loss(x.permute(0, 2, 3, 1), x, mask)
    with pytest.raises(InputError, match="working size"):
        edges.edge_loss(x, edges.reference_edges(torch.rand(1, 3, 8, 8)), mask)
    with pytest.raises(InputError, match="aspect"):
        edges.edge_loss(x, x, torch.ones(1, 16, 8))
    with pytest.raises(InputError, match="without one"):
        edges.edge_loss(x, edges.reference_edges(x), mask, tiny_model)
    with pytest.raises(InputError, match="batch mismatch"):
        edges.edge_loss(torch.rand(3, 3, 16, 16), torch.rand(2, 3, 16, 16), mask)


def test_inputs_are_not_modified(tiny_model):
    x, ref = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    mask = torch.ones(1, 16, 16) * 0.5
    before = [t.clone() for t in (x, ref, mask)]
    edges.edge_loss(x, ref, mask, tiny_model)
    assert all(torch.equal(a, b) for a, b in zip(before, (x, ref, mask)))


# ---------------------------------------------------------------------------------------- nodes
def test_loader_node_lists_and_loads_the_models_folder(tmp_path, monkeypatch):
    folder = tmp_path / "models" / "pidinet"
    folder.mkdir(parents=True)
    model = random_pidinet("small", seed=11)
    save_published(model, folder / "table5_pidinet-small.pth")
    (folder / "notes.txt").write_text("not a model")
    monkeypatch.setenv("HARMONIZE_MODELS_DIR", str(tmp_path / "models"))

    spec = pidinet_nodes.HarmonizePiDiNetLoader.INPUT_TYPES()["required"]["pidinet_name"]
    assert spec[0] == ["table5_pidinet-small.pth"] and spec[1]["tooltip"]
    (loaded,) = pidinet_nodes.HarmonizePiDiNetLoader().load("table5_pidinet-small.pth")
    assert loaded.variant == "small"
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(WeightsError, match=r"not found\. Searched: .*pidinet"):
        pidinet_nodes.HarmonizePiDiNetLoader().load("table5_pidinet.pth")


def test_edge_map_node(tiny_model):
    node = pidinet_nodes.HarmonizeEdgeMap()
    image = torch.rand(2, 30, 45, 3)
    before = image.clone()
    (sobel,) = node.run(image, "sobel", 64, False)
    assert sobel.shape == (2, 40, 64, 3) and float(sobel.min()) >= 0 and float(sobel.max()) <= 1
    x = F.interpolate(image.permute(0, 3, 1, 2), size=(40, 64), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(sobel, edges.sobel_edges(x.clamp(0, 1)).permute(0, 2, 3, 1), atol=1e-6)

    (pidi,) = node.run(image, "pidinet", 0, True, pidinet=tiny_model)
    assert pidi.shape == (2, 30, 45, 3)
    assert torch.equal(pidi[..., 0], pidi[..., 2])
    assert torch.allclose(pidi.flatten(1).amax(1), torch.ones(2))
    assert torch.equal(image, before)
    with pytest.raises(InputError, match="needs a PiDiNet"):
        node.run(image, "pidinet", 64, False)


def test_nodes_follow_the_pack_conventions():
    for node_id, cls in pidinet_nodes.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("Harmonize")
        assert pidinet_nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("Harmonize: ")
        assert cls.CATEGORY.startswith("harmonize/") and cls.DESCRIPTION
        for group in cls.INPUT_TYPES().values():
            for name, spec in group.items():
                assert spec[1].get("tooltip"), (node_id, name)
