"""Attention control for the zero-shot harmonization, as diffusers attention processors.

``attention_control(unet, controller)`` swaps every attention processor of the UNet for a
``ControlledAttnProcessor`` for the duration of a ``with`` block and puts the original processors back
afterwards. A controlled processor asks the controller what to do for its layer at the current step:

- nothing (no controller, or the controller has no business with this layer now): it calls the original
  processor with the original arguments, so the UNet computes exactly what it computes unmodified;
- **store** (text-embedding refinement): the cross-attention probabilities of the selected layers are
  kept, averaged over heads, with their gradient;
- **inject** (Prompt-to-Prompt editing): for each ``(source_row, edited_row)`` pair of the batch, the edited
  row uses the source row's attention probabilities with its own values V. Rows not named as edited (the
  unconditional half of classifier-free guidance) are untouched.

Injection has two exact-arithmetic-equivalent implementations: ``explicit`` materialises the probability
matrix and copies the source rows into the edited rows (the definition; used when probabilities are
stored or recorded), and the default computes the edited rows with the source rows' queries and keys in
PyTorch's fused scaled-dot-product attention, which gives the same probabilities without materialising
them (a 64x64 latent has 4096x4096 self-attention maps per head).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PLACES = ("down", "mid", "up")


@dataclass(frozen=True)
class LayerInfo:
    name: str  # processor name, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    place: str  # "down" | "mid" | "up"
    index: int  # position in the UNet's processor order


def layer_info(name: str, index: int) -> LayerInfo:
    head = name.split(".", 1)[0]
    place = "down" if head.startswith("down") else "up" if head.startswith("up") else "mid"
    return LayerInfo(name, place, index)


def grid_for_tokens(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int, int] | None:
    """``(factor, h, w)`` of an attention layer with ``tokens`` spatial positions in a UNet run on a latent of
    ``latent_hw``: each UNet level halves the sides (rounding up, as a stride-2 convolution with padding 1)."""
    h, w = latent_hw
    factor = 1
    while h >= 1 and w >= 1:
        if h * w == tokens:
            return factor, h, w
        if h == 1 and w == 1:
            break
        h, w, factor = math.ceil(h / 2), math.ceil(w / 2), factor * 2
    return None


def cross_attention_factors(unet) -> dict[str, set[int]]:
    """Downscale factors (relative to the latent) at which the UNet has cross-attention, per place."""
    cfg = unet.config
    down = [2 ** j for j, t in enumerate(cfg.down_block_types) if "CrossAttn" in t]
    n = len(cfg.up_block_types)
    up = [2 ** (n - 1 - j) for j, t in enumerate(cfg.up_block_types) if "CrossAttn" in t]
    mid_type = getattr(cfg, "mid_block_type", None) or ""
    mid = [2 ** (len(cfg.down_block_types) - 1)] if "CrossAttn" in mid_type else []
    return {"down": set(down), "up": set(up), "mid": set(mid)}


def refinement_factor(unet, wanted: int = 4, places=("down", "up")) -> int:
    """The attention resolution used for the text-embedding refinement: ``wanted`` (4 = 16x16 for a 64x64
    latent, the paper's 16x16 at 512 px) when the UNet has cross-attention there, otherwise the nearest
    factor it has (tiny test models have fewer levels)."""
    have = sorted(set().union(*(cross_attention_factors(unet)[p] for p in places)))
    if not have:
        raise ValueError("the UNet has no cross-attention layers in " + "/".join(places))
    return min(have, key=lambda f: (abs(math.log2(f) - math.log2(wanted)), -f))


# ------------------------------------------------------------------------------------- controllers
@dataclass
class Action:
    store: bool = False
    inject: bool = False
    record: bool = False


class Controller:
    """Base controller: tracks the step and the latent size; does nothing."""

    explicit = False

    def __init__(self, latent_hw: tuple[int, int]):
        self.latent_hw = tuple(latent_hw)
        self.step = 0
        self.pairs: list[tuple[int, int]] = []

    def grid(self, tokens: int):
        g = grid_for_tokens(tokens, self.latent_hw)
        if g is None:
            raise ValueError(f"attention over {tokens} positions does not match a level of the latent {self.latent_hw}")
        return g

    def action(self, layer: LayerInfo, is_cross: bool, tokens: int) -> Action | None:
        return None

    def store(self, layer: LayerInfo, probs: torch.Tensor, grid) -> None:  # probs [B, heads, N, M]
        pass

    def record(self, layer: LayerInfo, is_cross: bool, probs: torch.Tensor) -> None:
        pass


class CrossAttentionStore(Controller):
    """Keeps the cross-attention probabilities (head-averaged, with gradient) of the layers at ``factor``
    in ``places``; ``maps()`` averages them over those layers: ``[B, h, w, tokens]``."""

    explicit = True

    def __init__(self, latent_hw, factor: int, places=("down", "up")):
        super().__init__(latent_hw)
        self.factor = int(factor)
        self.places = tuple(places)
        self.kept: list[torch.Tensor] = []
        self.grid_hw: tuple[int, int] | None = None

    def action(self, layer, is_cross, tokens):
        if not is_cross or layer.place not in self.places:
            return None
        factor, _, _ = self.grid(tokens)
        return Action(store=True) if factor == self.factor else None

    def store(self, layer, probs, grid):
        _, h, w = grid
        self.grid_hw = (h, w)
        self.kept.append(probs.mean(dim=1))

    def reset(self) -> None:
        self.kept = []

    def maps(self) -> torch.Tensor:
        if not self.kept:
            raise ValueError(f"no cross-attention layer at 1/{self.factor} of the latent was run")
        h, w = self.grid_hw
        m = torch.stack(self.kept).mean(dim=0)  # [B, N, M]
        return m.reshape(m.shape[0], h, w, m.shape[-1])


@dataclass
class InjectionSchedule:
    """When and where the edited branch takes the source branch's attention (fractions of the steps)."""

    steps: int
    cross: tuple[float, float] = (0.0, 1.0)
    self_: tuple[float, float] = (0.0, 1.0)
    cross_min_factor: int = 1  # 1 = every resolution; 4 = 1/4 of the latent and coarser
    self_min_factor: int = 1

    def _active(self, span, step):
        lo, hi = int(span[0] * self.steps), int(span[1] * self.steps)
        return lo <= step < hi

    def cross_at(self, step: int, factor: int) -> bool:
        return factor >= self.cross_min_factor and self._active(self.cross, step)

    def self_at(self, step: int, factor: int) -> bool:
        return factor >= self.self_min_factor and self._active(self.self_, step)


class AttentionInjection(Controller):
    """Prompt-to-Prompt injection: edited rows take the source rows' attention probabilities.

    ``pairs`` lists ``(source_row, edited_row)`` batch indices. ``record=True`` keeps every probability
    matrix after injection (``recorded``: list of ``(step, layer name, is_cross, probs [B,heads,N,M])``)
    and forces the explicit computation; use it for inspection on small inputs only."""

    def __init__(self, latent_hw, schedule: InjectionSchedule, pairs, explicit: bool = False, record: bool = False):
        super().__init__(latent_hw)
        self.schedule = schedule
        self.pairs = [(int(s), int(d)) for s, d in pairs]
        self.explicit = bool(explicit or record)
        self.recording = bool(record)
        self.recorded: list = []

    def action(self, layer, is_cross, tokens):
        factor, _, _ = self.grid(tokens)
        inject = self.schedule.cross_at(self.step, factor) if is_cross else self.schedule.self_at(self.step, factor)
        if not inject and not self.recording:
            return None
        return Action(inject=inject, record=self.recording)

    def record(self, layer, is_cross, probs):
        self.recorded.append((self.step, layer.name, is_cross, probs.detach().clone()))


# -------------------------------------------------------------------------------------- processors
class _Hub:
    def __init__(self, controller: Controller | None):
        self.controller = controller


class ControlledAttnProcessor:
    """Wraps one layer's original processor; see the module docstring."""

    def __init__(self, original, layer: LayerInfo, hub: _Hub):
        self.original = original
        self.layer = layer
        self.hub = hub

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        ctrl = self.hub.controller
        action = None
        if ctrl is not None:
            tokens = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
            action = ctrl.action(self.layer, encoder_hidden_states is not None, tokens)
        if action is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return self._controlled(ctrl, action, attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def _controlled(self, ctrl: Controller, action: Action, attn, hidden_states, encoder_hidden_states,
                    attention_mask, temb):
        # Same computation as diffusers' AttnProcessor, with the probabilities exposed.
        is_cross = encoder_hidden_states is not None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b4, c4, h4, w4 = hidden_states.shape
            hidden_states = hidden_states.view(b4, c4, h4 * w4).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape
        seq_len = tokens if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        heads = attn.heads
        q = query.view(batch, -1, heads, query.shape[-1] // heads).transpose(1, 2)  # [B, h, N, d]
        k = key.view(batch, -1, heads, key.shape[-1] // heads).transpose(1, 2)
        v = value.view(batch, -1, heads, value.shape[-1] // heads).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        n, m, d = q.shape[2], k.shape[2], q.shape[3]

        pairs = ctrl.pairs if action.inject else []
        src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=q.device)
        dst = torch.tensor([t for _, t in pairs], dtype=torch.long, device=q.device)

        if ctrl.explicit or action.store or action.record:
            probs = attn.get_attention_scores(q.reshape(batch * heads, n, d), k.reshape(batch * heads, m, d),
                                              attention_mask)
            probs = probs.view(batch, heads, n, m)
            if pairs:
                probs = probs.index_copy(0, dst, probs.index_select(0, src))
            if action.store:
                ctrl.store(self.layer, probs, ctrl.grid(tokens))
            if action.record:
                ctrl.record(self.layer, is_cross, probs)
            out = torch.matmul(probs, v)
        else:
            if pairs:  # same probabilities: the edited rows attend with the source rows' queries and keys
                q = q.index_copy(0, dst, q.index_select(0, src))
                k = k.index_copy(0, dst, k.index_select(0, src))
            mask4 = None
            if attention_mask is not None:
                mask4 = attention_mask.view(batch, heads, -1, attention_mask.shape[-1])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask4, dropout_p=0.0, is_causal=False,
                                                 scale=attn.scale)

        out = out.transpose(1, 2).reshape(batch, n, heads * d).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b4, c4, h4, w4)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def attention_control(unet, controller: Controller | None = None):
    """Install controlled processors on every attention layer of ``unet`` for the block; yields a handle
    whose ``.controller`` may be swapped between UNet calls. The original processors are restored on exit."""
    originals = dict(unet.attn_processors)
    hub = _Hub(controller)
    wrapped = {name: ControlledAttnProcessor(proc, layer_info(name, i), hub)
               for i, (name, proc) in enumerate(originals.items())}
    unet.set_attn_processor(wrapped)
    try:
        yield hub
    finally:
        unet.set_attn_processor(originals)
