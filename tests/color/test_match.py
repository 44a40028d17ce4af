"""The weight-free baseline: Lab colour statistics matching, and its full-resolution run through restore."""
from __future__ import annotations

import torch
from kornia.color import rgb_to_lab

from comfyui_harmonize.pipelines.color import match


def _textured(h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A composite with fine texture everywhere and a mismatched (bright, warm, low-contrast) foreground."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([0.3 + 0.2 * xx, 0.35 + 0.2 * yy, 0.5 - 0.1 * xx], -1)
    image = (base + 0.15 * torch.rand(h, w, 3, generator=g)).clamp(0, 1)[None]
    mask = torch.zeros(1, h, w)
    mask[:, h // 4: 3 * h // 4, w // 3: 2 * w // 3] = 1
    fg = mask[0] > 0.5
    image[0][fg] = image[0][fg] * 0.4 + torch.tensor([0.55, 0.4, 0.2])
    return image, mask


def test_color_match_moves_foreground_lab_statistics_to_the_background():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 40, 50, 3, generator=g) * 0.5
    image[:, 10:30, 10:30] = image[:, 10:30, 10:30] * 0.4 + 0.55
    mask = torch.zeros(2, 40, 50)
    mask[:, 10:30, 10:30] = 1
    mask[1] = 0  # empty mask: unchanged
    copy = image.clone()
    out = match.lab_color_match(image, mask)
    assert torch.equal(image, copy)
    assert torch.equal(out[1], image[1])
    fg = mask[0] > 0.5
    assert torch.equal(out[0][~fg], image[0][~fg])  # the background is untouched
    lab_out = rgb_to_lab(out[:1].permute(0, 3, 1, 2))[0].flatten(1)
    lab_in = rgb_to_lab(image[:1].permute(0, 3, 1, 2))[0].flatten(1)
    f, b = lab_out[:, fg.flatten()], lab_in[:, ~fg.flatten()]
    assert torch.allclose(f.mean(1), b.mean(1), atol=0.5)
    assert torch.allclose(f.std(1), b.std(1), rtol=0.05, atol=0.3)


def test_below_the_working_resolution_it_is_the_plain_match():
    image, mask = _textured(60, 90)
    out = match.harmonize_color_match(image, mask, resolution=128, detail="resample")
    assert torch.equal(out, match.lab_color_match(image, mask))


def test_full_resolution_transfer_keeps_detail_and_background():
    """Matched at 96 px and applied to a 240x360 composite: the background is the composite bit for bit,
    and transferring the colour change reproduces the full-resolution match (which sees every pixel)
    more closely than upscaling the small result, whose texture is blurred away."""
    image, mask = _textured(240, 360, seed=1)
    copy, mask_copy = image.clone(), mask.clone()
    ideal = match.lab_color_match(image, mask)
    transfer = match.harmonize_color_match(image, mask, resolution=96, detail="transfer")
    resample = match.harmonize_color_match(image, mask, resolution=96, detail="resample")
    assert torch.equal(image, copy) and torch.equal(mask, mask_copy)
    assert transfer.shape == image.shape
    bg = mask[0] < 0.5
    assert torch.equal(transfer[0][bg], image[0][bg])
    fg = ~bg
    err_transfer = (transfer[0][fg] - ideal[0][fg]).abs().mean()
    err_resample = (resample[0][fg] - ideal[0][fg]).abs().mean()
    assert err_transfer < 0.7 * err_resample, (float(err_transfer), float(err_resample))
    # the foreground's colour moved towards the background's (the point of the method)
    lab = lambda t: rgb_to_lab(t.permute(0, 3, 1, 2))[0]  # noqa: E731
    before = (lab(image)[:, fg].mean(1) - lab(image)[:, bg].mean(1)).norm()
    after = (lab(transfer)[:, fg].mean(1) - lab(image)[:, bg].mean(1)).norm()
    assert after < 0.2 * before, (float(before), float(after))


def test_empty_mask_returns_the_composite():
    image, _ = _textured(50, 70)
    out = match.harmonize_color_match(image, torch.zeros(1, 50, 70), resolution=32)
    assert torch.equal(out, image)
