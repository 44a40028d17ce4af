"""The one prompt encoder of the pack: CLIP token ids padded to the tokenizer's length (77), the text
encoder's last hidden state, and a cache of prompt embeddings kept on the components (``SDComponents.cache``),
so a prompt is encoded once per text-encoder device and dtype whichever system asks for it (DiffHarmony's
empty prompt, zero-shot's empty prompt, training)."""
from __future__ import annotations

import torch

from .loading import SDComponents


def token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """``[N, 77]`` token ids, padded and truncated to the tokenizer's maximum length."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_ids(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """The text encoder's last hidden state ``[N, 77, D]`` for token ids already on its device."""
    out = text_encoder(ids)
    return out if isinstance(out, torch.Tensor) else out[0]


def text_encoder_device(sd: SDComponents) -> torch.device:
    return next(sd.text_encoder.parameters()).device


@torch.no_grad()
def prompt_embedding(sd: SDComponents, prompt: str = "", device: torch.device | None = None) -> torch.Tensor:
    """``[1, 77, D]`` embedding of ``prompt`` in the text encoder's dtype, computed on ``device`` (default: where
    the text encoder's weights are); cached per prompt, device and dtype (callers must not modify it)."""
    device = torch.device(device) if device is not None else text_encoder_device(sd)
    key = ("prompt", prompt, device, sd.text_encoder.dtype)
    if key not in sd.cache:
        sd.cache[key] = encode_ids(sd.text_encoder, token_ids(sd.tokenizer, [prompt]).to(device))
    return sd.cache[key]
