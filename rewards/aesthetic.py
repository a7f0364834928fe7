"""The LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor): an MLP on
CLIP ViT-L/14 image embeddings, trained on human aesthetic ratings (SAC, LAION-Logos, AVA) — the
aesthetic reward of DDPO and Flow-GRPO.

For episode i with final image x_i (the prompt is not used)::

    u_i = f_img(x_i) / ‖f_img(x_i)‖₂      CLIPModel.get_image_features, L2-normalised
    R_i = MLP(u_i)                         on the ratings' 1..10 scale

with the MLP as published, without activations (so it is affine in u; Dropout is a no-op at
inference)::

    layers.0  Linear(d, 1024)      d = the CLIP model's projection_dim (768 for ViT-L/14)
    layers.1  Dropout(0.2)
    layers.2  Linear(1024, 128)
    layers.3  Dropout(0.2)
    layers.4  Linear(128, 64)
    layers.5  Dropout(0.1)
    layers.6  Linear(64, 16)
    layers.7  Linear(16, 1)

:class:`AestheticHead` keeps these state-dict keys (``layers.0.weight``, ``layers.0.bias``,
``layers.2.weight``, ..., ``layers.7.bias``), so the published weights load unchanged. The head
is read from a safetensors file only (no pickle), named by the option ``head``:

* a ``.safetensors`` file, or a folder holding ``head_filename`` (default ``model.safetensors``);
* otherwise a hub repo id, whose ``head_filename`` is fetched with ``huggingface_hub.hf_hub_download``.
  Default: ``ttj/sac-logos-ava1-l14-linearMSE``, a safetensors port of the predictor's
  ``sac+logos+ava1-l14-linearMSE.pth`` (the weights DDPO and Flow-GRPO use).

To convert the original ``.pth`` (a plain state dict with the keys above) yourself::

    import torch
    from safetensors.torch import save_file
    state = torch.load("sac+logos+ava1-l14-linearMSE.pth", map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, "aesthetic_head.safetensors")

The CLIP model (option ``checkpoint``, default ``openai/clip-vit-large-patch14``, the model the
predictor was trained on) and the options ``processor``, ``device``, ``dtype`` and ``batch_size``
are those of :mod:`.clip_score`; the head runs in float32 on ``device``. Components: none (the
score is the predictor's output).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from unigrpo_env.rewards.clip_score import ClipRewardBase, image_embeddings
from unigrpo_env.rewards.hf_models import _one_line

__all__ = ["AestheticReward", "AestheticHead", "resolve_head", "DEFAULT_HEAD"]

#: The hub repo the predictor's weights are read from by default (a safetensors port).
DEFAULT_HEAD = "ttj/sac-logos-ava1-l14-linearMSE"


class AestheticHead(nn.Module):
    """The improved-aesthetic-predictor's MLP (see the module docstring): ``[N, d] → [N, 1]``."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = int(input_size)
        self.layers = nn.Sequential(
            nn.Linear(self.input_size, 1024),  # layers.0
            nn.Dropout(0.2),
            nn.Linear(1024, 128),  # layers.2
            nn.Dropout(0.2),
            nn.Linear(128, 64),  # layers.4
            nn.Dropout(0.1),
            nn.Linear(64, 16),  # layers.6
            nn.Linear(16, 1),  # layers.7
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)

    def save_safetensors(self, path: str | Path) -> None:
        """Write the state dict (keys ``layers.0.weight`` ...) to a safetensors file."""
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path))

    @classmethod
    def from_safetensors(cls, path: str | Path, input_size: int | None = None) -> AestheticHead:
        """The head whose weights ``path`` holds; ``input_size`` (default: read from
        ``layers.0.weight``) must match them. Raises :class:`ValueError` (one line) otherwise."""
        try:
            state = load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise ValueError(f"head {str(path)!r} is not a readable safetensors file: {_one_line(exc)}") from exc
        if "layers.0.weight" not in state:
            raise ValueError(
                f"head {str(path)!r} has keys {sorted(state)[:4]}...; expected the aesthetic MLP's "
                "layers.0.weight, layers.0.bias, layers.2.weight, ..., layers.7.bias"
            )
        found = int(state["layers.0.weight"].shape[1])
        if input_size is not None and found != int(input_size):
            raise ValueError(
                f"head {str(path)!r} takes {found}-dim embeddings; the CLIP model's projection_dim is {input_size}"
            )
        head = cls(found)
        try:
            head.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"head {str(path)!r} does not fit the aesthetic MLP: {_one_line(exc)}") from exc
        return head.eval()


def resolve_head(head: str | None, head_filename: str = "model.safetensors") -> Path:
    """The local safetensors file the option ``head`` names: the file itself, ``head_filename``
    in a folder, or ``head_filename`` of a hub repo (downloaded to the hub cache). Default:
    :data:`DEFAULT_HEAD`."""
    name = head or DEFAULT_HEAD
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / head_filename).is_file():
            return path / head_filename
        raise ValueError(f"head folder {name!r} holds no {head_filename!r}; expected the aesthetic MLP's safetensors")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=name, filename=head_filename))
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"head {name!r} is neither a safetensors file, a folder holding {head_filename!r}, nor a hub repo "
            f"with it (e.g. {DEFAULT_HEAD!r}): {_one_line(exc)}"
        ) from exc


@functools.lru_cache(maxsize=8)
def _load_head(path: str, input_size: int, device: str) -> AestheticHead:
    return AestheticHead.from_safetensors(path, input_size).to(device).requires_grad_(False)


class AestheticReward(ClipRewardBase):
    """``R = MLP(u)``: the LAION aesthetic predictor v2 on the L2-normalised CLIP image embedding
    ``u``; see the module docstring for the options ``head`` and ``head_filename``."""

    default_checkpoint = "openai/clip-vit-large-patch14"
    needs_prompt = False

    def __init__(
        self,
        checkpoint: str | None = None,
        processor: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int = 32,
        head: str | None = None,
        head_filename: str = "model.safetensors",
    ):
        super().__init__(checkpoint, processor, device, dtype, batch_size)
        self.head_path = str(resolve_head(head, head_filename))
        self.head = _load_head(self.head_path, int(self.model.config.projection_dim), self.device)

    def score_chunk(
        self, pixel_values: torch.Tensor, prompts: list[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        embeddings = image_embeddings(self.model, pixel_values)  # u = f(x) / ‖f(x)‖₂, float32
        return self.head(embeddings).squeeze(-1), {}  # R = MLP(u)
