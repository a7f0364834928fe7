"""ShapesWorld's flow-matching image model: a small diffusers ``SD3Transformer2DModel`` (MMDiT).

The model works in pixel space: its latent is the ``3 × 32 × 32`` RGB image scaled to ``[-1, 1]``,
channels first (exactly :class:`unigrpo_env.PixelCodec`). It predicts the flow-matching velocity
``v = ε − x_0`` of ``x_t = (1 − t)·x_0 + t·ε`` (t = 1 noise, t = 0 data), conditioned on

- the scene description's token ids (ShapesWorld's word-level tokenizer), embedded by a token
  embedding plus a learned position embedding and fed to the MMDiT as its text stream
  (``encoder_hidden_states``); their masked mean (over non-pad tokens) is the pooled projection
  that, together with the time, drives the adaptive layer norms;
- an optional previous image (for edits), concatenated to the noisy image as extra input
  channels (``in_channels = 2·channels``). No previous image is the all-zero tensor.

Unconditional inputs (for classifier-free guidance) are the *empty text*, ``text_ids`` all equal
to ``pad_token_id`` (the masked mean is then defined as zero), and/or ``cond_image=None``. The
model is trained with both dropped at random (see :mod:`.flow_training`), so ``v(x, t, "")`` is
the unconditional velocity that :func:`unigrpo_env.flow.cfg_velocity` expects.

Parameterisation. ``forward`` always returns the velocity. With ``prediction="sample"`` (the
default, as in JiT: Li & He, "Back to Basics: Let Denoising Generative Models Denoise", 2025) the
transformer's output is the clean image x̂_0 and the velocity is ``(x_t − x̂_0) / max(t, min_t)``;
with ``prediction="velocity"`` the output is the velocity itself (SD3's choice). Measured on
ShapesWorld (same budget, 1500-2200 steps): x̂_0-prediction reaches GenEval-correct 0.96 where
v-prediction stays at 0.57, because a scene's image is a near-deterministic, very low-dimensional
function of its text, which x̂_0 states directly while v also has to reproduce the noise. For
``t < min_t`` the velocity is not ``ε − x_0``-consistent any more; samplers never evaluate there
(the last Euler step starts at ``t = 1/num_steps``).

Padding. SD3's joint attention has no attention mask, so pad tokens take part in attention.
To make the output independent of how much padding the caller used, ``forward`` always pads
``text_ids`` on the right to ``max_text_tokens``; text longer than that raises ``ValueError``.

Saved and loaded like any diffusers model: ``model.save_pretrained(dir)`` writes ``config.json``
and ``diffusion_pytorch_model.safetensors``; ``ShapesFlowTransformer.from_pretrained(dir)``
rebuilds it.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin, SD3Transformer2DModel
from diffusers.configuration_utils import register_to_config
from torch import nn

__all__ = ["PREDICTIONS", "ShapesFlowTransformer"]

#: What the transformer's output means: the velocity itself, or the clean image x̂_0 from which
#: the velocity is computed as (x_t − x̂_0) / max(t, min_t).
PREDICTIONS = ("velocity", "sample")


class ShapesFlowTransformer(ModelMixin, ConfigMixin):
    """Text- and image-conditioned velocity model for ShapesWorld (see the module docstring).

    Args:
        vocab_size: size of the token vocabulary (``build_tokenizer().get_vocab_size()``).
        max_text_tokens: the longest text (in tokens) the model accepts; shorter text is padded.
        image_size: side of the square canvas in pixels.
        channels: image channels (3 for RGB); the transformer sees ``2·channels`` (noisy image and
            previous image).
        patch_size: side of the square patches the image is cut into (tokens = (size/patch)²).
        num_layers: number of joint (MMDiT) transformer blocks.
        num_attention_heads, attention_head_dim: the width is their product.
        pad_token_id: the id of the padding token; all-pad text is the unconditional input.
        zero_init: start the output projection and every adaLN modulation at zero (DiT-style).
        prediction: ``"sample"`` (output x̂_0) or ``"velocity"`` (see the module docstring).
        min_t: lower clamp of ``t`` in ``(x_t − x̂_0) / t`` for ``prediction="sample"``.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        vocab_size: int,
        max_text_tokens: int = 24,
        image_size: int = 32,
        channels: int = 3,
        patch_size: int = 4,
        num_layers: int = 4,
        num_attention_heads: int = 4,
        attention_head_dim: int = 32,
        pad_token_id: int = 0,
        zero_init: bool = True,
        prediction: str = "sample",
        min_t: float = 0.05,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if not 0 <= pad_token_id < vocab_size:
            raise ValueError(f"pad_token_id must be in [0, {vocab_size}), got {pad_token_id}")
        dim = num_attention_heads * attention_head_dim
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.text_position = nn.Parameter(torch.zeros(max_text_tokens, dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text_position, std=0.02)
        self.transformer = SD3Transformer2DModel(
            sample_size=image_size,
            patch_size=patch_size,
            in_channels=2 * channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=dim,
            caption_projection_dim=dim,
            pooled_projection_dim=dim,
            out_channels=channels,
            pos_embed_max_size=image_size // patch_size,
        )
        if zero_init:
            self._zero_init()

    def _zero_init(self) -> None:
        """DiT-style init: the output projection and every adaLN modulation start at zero, so each
        block starts as the identity and the initial velocity is 0 (trains faster from scratch)."""
        tr = self.transformer
        nn.init.zeros_(tr.proj_out.weight)
        nn.init.zeros_(tr.proj_out.bias)
        for module in tr.modules():
            if module is tr:
                continue
            linear = getattr(module, "linear", None)
            if isinstance(linear, nn.Linear) and "Norm" in type(module).__name__:
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)

    # ------------------------------------------------------------------------------- helpers

    @property
    def dim(self) -> int:
        return int(self.config.num_attention_heads * self.config.attention_head_dim)

    def pad_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """``text_ids`` [B, L] right-padded with ``pad_token_id`` to ``[B, max_text_tokens]``."""
        if not isinstance(text_ids, torch.Tensor) or text_ids.ndim != 2:
            raise ValueError(
                f"text_ids must be a [B, L] tensor of token ids, got {getattr(text_ids, 'shape', text_ids)!r}"
            )
        if text_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"text_ids must be an integer tensor, got dtype {text_ids.dtype}")
        max_len = int(self.config.max_text_tokens)
        length = text_ids.shape[1]
        if length > max_len:
            # Trailing padding beyond the limit is harmless; real tokens beyond it are not.
            pad = int(self.config.pad_token_id)
            if bool((text_ids[:, max_len:] != pad).any()):
                raise ValueError(f"text has {length} tokens but the model accepts at most max_text_tokens={max_len}")
            return text_ids[:, :max_len].long()
        if length < max_len:
            filler = text_ids.new_full((text_ids.shape[0], max_len - length), int(self.config.pad_token_id))
            text_ids = torch.cat([text_ids, filler], dim=1)
        return text_ids.long()

    def encode_text(self, text_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states [B, max_text_tokens, dim], pooled [B, dim]) of (padded) text ids."""
        ids = self.pad_text(text_ids)
        if bool((ids < 0).any()) or bool((ids >= self.config.vocab_size).any()):
            raise ValueError(f"text_ids must lie in [0, {self.config.vocab_size})")
        tokens = self.token_embedding(ids)
        mask = (ids != int(self.config.pad_token_id)).to(tokens.dtype).unsqueeze(-1)
        pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # empty text -> 0
        states = tokens + self.text_position.unsqueeze(0)
        return states, pooled

    # ------------------------------------------------------------------------------- forward

    def check_latent_shape(self, shape: tuple[int, ...]) -> None:
        """The network draws one canvas size: ``(channels, image_size, image_size)``."""
        cfg = self.config
        if tuple(shape) != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"the flow model draws {cfg.channels}×{cfg.image_size}×{cfg.image_size} latents "
                f"(a {cfg.image_size}-pixel canvas) only"
            )

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text_ids: torch.Tensor,
        cond_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity ``v(x_t, t | text, cond_image)`` with the shape of ``x_t``.

        Args:
            x_t: noisy images ``[B, C, H, W]`` in the PixelCodec's scale.
            t: times in [0, 1], ``[B]`` or a scalar (fed to SD3 as ``t·1000``).
            text_ids: ``[B, L]`` token ids, right-padded with ``pad_token_id``, ``L <= max_text_tokens``
                (all pad = the empty, unconditional text).
            cond_image: the previous image ``[B, C, H, W]`` (PixelCodec scale), or None for none
                (the same as zeros).
        """
        cfg = self.config
        expected = (cfg.channels, cfg.image_size, cfg.image_size)
        if x_t.ndim != 4 or tuple(x_t.shape[1:]) != expected:
            raise ValueError(
                f"x_t must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}], got {tuple(x_t.shape)}"
            )
        batch = x_t.shape[0]
        if text_ids.ndim != 2 or text_ids.shape[0] != batch:
            raise ValueError(f"text_ids must have shape [B={batch}, L], got {tuple(text_ids.shape)}")
        dtype = self.token_embedding.weight.dtype
        x_t = x_t.to(dtype)
        if cond_image is None:
            cond_image = torch.zeros_like(x_t)
        elif tuple(cond_image.shape) != tuple(x_t.shape):
            raise ValueError(f"cond_image must have the shape of x_t {tuple(x_t.shape)}, got {tuple(cond_image.shape)}")
        t = torch.as_tensor(t, dtype=dtype, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or have shape [B={batch}], got {tuple(t.shape)}")
        states, pooled = self.encode_text(text_ids.to(x_t.device))
        hidden = torch.cat([x_t, cond_image.to(dtype)], dim=1)
        out = self.transformer(
            hidden_states=hidden,
            encoder_hidden_states=states,
            pooled_projections=pooled,
            timestep=t * 1000.0,
            return_dict=False,
        )[0]
        if cfg.prediction == "velocity":
            return out
        # x-prediction (as in JiT, "Back to Basics: Let Denoising Generative Models Denoise"):
        # the network outputs x̂_0 and the velocity follows from x_t = (1 − t)·x_0 + t·ε.
        denom = t.clamp(min=float(cfg.min_t)).view(-1, 1, 1, 1)
        return (x_t - out) / denom
