"""The one prompt encoder (sd/prompts.py): DiffHarmony, zero-shot and training encode a prompt through it,
once per text-encoder device and dtype."""
from __future__ import annotations

import torch

from comfyui_harmonize.pipelines.diffharmony import pipeline as dh
from comfyui_harmonize.pipelines.sd import models as sd_models
from comfyui_harmonize.pipelines.sd import prompts
from comfyui_harmonize.pipelines.zero_shot.model import ZeroShotModel


def test_one_cached_encoder_for_both_systems(models_root):
    sd = sd_models.load_sd(models_root / "diffusers" / "tiny-txt2img")
    calls = []
    handle = sd.text_encoder.register_forward_hook(lambda m, a, out: calls.append(a[0].shape))
    try:
        with torch.no_grad():
            ids = sd.tokenizer(["a photo"], padding="max_length", max_length=sd.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids
            direct = sd.text_encoder(ids).last_hidden_state
        calls.clear()
        emb = prompts.prompt_embedding(sd, "a photo")
        assert torch.equal(emb, direct) and emb.shape == (1, sd.tokenizer.model_max_length, direct.shape[-1])
        assert prompts.prompt_embedding(sd, "a photo") is emb  # cached
        empty = dh.prompt_embedding(sd, "")  # DiffHarmony's name for the same function
        zs = ZeroShotModel(sd).empty_embedding()
        assert torch.equal(zs, empty.float())
        assert calls == [(1, 77), (1, 77)]  # "a photo" once, "" once, whichever system asked
    finally:
        handle.remove()
    assert torch.equal(prompts.token_ids(sd.tokenizer, ["a photo"]), ids)
