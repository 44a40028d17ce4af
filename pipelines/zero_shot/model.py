"""The text-to-image model the zero-shot harmonization runs on, and the count of the work it does.

``ZeroShotModel`` wraps the Stable Diffusion components loaded by ``models.load_sd`` (SD 2-base, the
official default, or SD 1.x) with DDIM schedulers built from the model's own scheduler config, prompt
encoding, VAE encoding/decoding and the working-size rule.

``WorkCounter`` counts forward and backward passes through the UNet, the VAE encoder/decoder, the text
encoder and the edge network. The counts are taken by module hooks while a pipeline function runs, so
they are what was actually computed, not an estimate.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

# diffusers and transformers are imported where first used: importing them adds seconds to ComfyUI's start-up
# (which imports every node module), while a graph that never loads this model does not need them.
from ..core import images
from ..core.errors import InputError, WeightsError
from ..sd import prompts as prompts_
from ..sd.loading import SDComponents

COUNTED = ("unet", "vae_encoder", "vae_decoder", "text_encoder", "pidinet")


# ----------------------------------------------------------------------------------------- counting
@dataclass
class WorkCounter:
    """Passes per network: ``forward`` calls, ``samples`` (sum of the batch sizes of those calls),
    ``backward`` passes (gradients that flowed back through the network) and ``backward_samples`` (the batch
    sizes of the forward calls those backward passes went through)."""

    counts: dict = field(default_factory=dict)

    def add(self, net: str, kind: str, n: int = 1) -> None:
        entry = self.counts.setdefault(net, {"forward": 0, "samples": 0, "backward": 0, "backward_samples": 0})
        entry[kind] += int(n)

    def get(self, net: str, kind: str = "forward") -> int:
        return self.counts.get(net, {}).get(kind, 0)

    def merge(self, other: "WorkCounter") -> "WorkCounter":
        for net, entry in other.counts.items():
            for kind, n in entry.items():
                self.add(net, kind, n)
        return self

    def as_dict(self) -> dict:
        return {net: dict(self.counts[net]) for net in COUNTED if net in self.counts}

    def report(self) -> str:
        """One line per network, e.g. ``unet: 250 forward (400 rows), 100 backward (200 rows)``."""
        lines = []
        for net in COUNTED:
            if net not in self.counts:
                continue
            e = self.counts[net]
            lines.append(f"{net}: {e['forward']} forward ({e['samples']} rows), {e['backward']} backward "
                         f"({e['backward_samples']} rows)")
        return "\n".join(lines) if lines else "no network passes"


def _first_tensor(obj):
    if isinstance(obj, torch.Tensor):
        return obj
    if hasattr(obj, "sample") and isinstance(obj.sample, torch.Tensor):  # diffusers outputs
        return obj.sample
    if hasattr(obj, "last_hidden_state"):  # transformers outputs
        return obj.last_hidden_state
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def _tensors(items) -> list:
    return [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()]


class _Counting:
    """Forward hooks on the counted networks that add to every WorkCounter on the stack."""

    def __init__(self):
        self.stack: list[WorkCounter] = []
        self.handles: list = []
        self.hooked: set[int] = set()

    def hook(self, net: str, module: torch.nn.Module | None) -> None:
        if module is None or id(module) in self.hooked:
            return
        stack = self.stack

        def forward_hook(mod, args, kwargs, output):
            inp = _first_tensor(args) if args else _first_tensor(kwargs)
            batch = int(inp.shape[0]) if inp is not None and inp.dim() > 0 else 1
            counters = list(stack)
            for w in counters:
                w.add(net, "forward")
                w.add(net, "samples", batch)
            # A backward pass through the network reaches its output (when the loss depends on it) and/or
            # its differentiable inputs (also when the loss taps an inner layer, as the attention maps of
            # the embedding refinement do): count the first of those gradients once per forward call.
            watched = [t for t in (_first_tensor(output), *_tensors(args), *_tensors(kwargs.values()))
                       if t is not None and t.requires_grad]
            if watched:
                seen = [False]

                def backward_hook(grad):
                    if not seen[0]:
                        seen[0] = True
                        for w in counters:
                            w.add(net, "backward")
                            w.add(net, "backward_samples", batch)
                    return grad

                for t in watched:
                    t.register_hook(backward_hook)

        self.handles.append(module.register_forward_hook(forward_hook, with_kwargs=True))
        self.hooked.add(id(module))

    def clear(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.hooked.clear()


def gradients():
    """Context for the optimisation steps: gradients on even inside a caller's ``no_grad``. Under
    ``torch.inference_mode()`` (ComfyUI runs nodes in it) nothing can be differentiated: say so."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "the zero-shot optimisation needs autograd, but torch.inference_mode() is on: run it outside inference "
            "mode with weights created outside it (the pack's nodes do this through host.autograd_node)"
        )
    return torch.enable_grad()


# -------------------------------------------------------------------------------------------- model
class ZeroShotModel:
    """A text-to-image Stable Diffusion model (4 latent input channels) prepared for the zero-shot method."""

    def __init__(self, components: SDComponents, device: torch.device | str | None = None):
        unet = components.unet
        in_ch = unet.config.in_channels
        if in_ch != components.latent_channels:
            raise WeightsError(
                f"{components.source}: the UNet takes {in_ch} input channels, but zero-shot harmonization needs a "
                f"text-to-image Stable Diffusion model ({components.latent_channels} channels, e.g. SD 2-base or "
                f"SD 1.5); an inpainting model (9 channels) does not fit."
            )
        self.components = components
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._counting = _Counting()

    # -- parts
    @property
    def unet(self):
        return self.components.unet

    @property
    def vae(self):
        return self.components.vae

    @property
    def text_encoder(self):
        return self.components.text_encoder

    @property
    def tokenizer(self):
        return self.components.tokenizer

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def vae_scale(self) -> int:
        return self.components.vae_scale_factor

    @property
    def latent_multiple(self) -> int:
        """Latent sides are multiples of this, so every UNet level has an exact size."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def pixel_multiple(self) -> int:
        return self.vae_scale * self.latent_multiple

    def working_size(self, height: int, width: int, long_side: int) -> tuple[int, int]:
        """Working size: ``long_side`` on the long side, the aspect ratio kept, sides multiples of
        ``pixel_multiple`` (64 for Stable Diffusion)."""
        m = self.pixel_multiple
        if long_side < m:
            raise InputError(f"resolution must be at least {m} for this model, got {long_side}")
        long_side = (long_side // m) * m
        return images.fit_size(height, width, long_side, multiple=m)

    def to(self, device: torch.device | str) -> "ZeroShotModel":
        self.device = torch.device(device)
        return self

    # -- schedulers
    def ddim(self, steps: int):
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(self.components.scheduler_config)
        sched.set_timesteps(steps)
        return sched

    def ddim_inverse(self, steps: int):
        from diffusers import DDIMInverseScheduler

        sched = DDIMInverseScheduler.from_config(self.components.scheduler_config)
        sched.set_timesteps(steps)
        return sched

    # -- counting
    @contextlib.contextmanager
    def counting(self, work: WorkCounter | None, pidinet: torch.nn.Module | None = None):
        """Count the passes made inside the block into ``work`` (nested blocks each get their share)."""
        c = self._counting
        c.hook("unet", self.unet)
        c.hook("vae_encoder", getattr(self.vae, "encoder", None))
        c.hook("vae_decoder", getattr(self.vae, "decoder", None))
        c.hook("text_encoder", self.text_encoder)
        if pidinet is not None:
            c.hook("pidinet", pidinet)
        if work is not None:
            c.stack.append(work)
        try:
            yield work
        finally:
            if work is not None:
                c.stack.remove(work)
            if not c.stack:
                c.clear()

    # -- text
    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        return prompts_.token_ids(self.tokenizer, prompts)

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return prompts_.encode_ids(self.text_encoder, ids.to(self.device))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_ids(self.token_ids(prompts)).float()

    def empty_embedding(self) -> torch.Tensor:
        """The empty-prompt embedding ``[1, 77, D]`` in float32 (encoded once: sd/prompts.py's cache)."""
        return prompts_.prompt_embedding(self.components, "", self.device).float()

    # -- UNet
    def unet_out(self, latents: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
        """UNet prediction in float32 for float32 ``latents`` and ``context``."""
        out = self.unet(latents.to(self.dtype), t, encoder_hidden_states=context.to(self.dtype)).sample
        return out.float()

    # -- VAE
    @torch.no_grad()
    def encode_image(self, image_bhwc: torch.Tensor, seed: int) -> torch.Tensor:
        """IMAGE ``[1,H,W,3]`` 0..1 -> scaled latent ``[1,C,h,w]`` float32 (a sample of the posterior, seeded)."""
        x = images.to_signed(image_bhwc).to(self.device, self.dtype)
        dist = self.vae.encode(x).latent_dist
        gen = torch.Generator("cpu").manual_seed(int(seed))
        noise = torch.randn(dist.mean.shape, generator=gen, dtype=torch.float32).to(self.device, dist.mean.dtype)
        latent = dist.mean + dist.std * noise
        return latent.float() * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> image ``[B,3,H,W]`` in 0..1 float32 (differentiable; wrap in no_grad when not
        optimizing)."""
        x = self.vae.decode((latents / self.scaling_factor).to(self.dtype)).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def modules_to_device(self, load) -> torch.device:
        """Move the networks to the compute device with ``load(module) -> device`` (host.load_to_device)."""
        device = None
        for m in (self.unet, self.vae, self.text_encoder):
            device = load(m)
        self.device = torch.device(device)
        return self.device
