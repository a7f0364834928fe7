"""Adapters from Hugging Face models to the policy protocol.

* :class:`CausalLMTextPolicy` — any ``transformers`` causal LM whose tokenizer is the
  environment's: batched sampling with a KV cache and per-token log-probabilities, and a
  one-pass recomputation of log-probabilities with gradients.
* :class:`ConditionedFlowPolicy` — any velocity model ``model(x_t, t, **condition)`` (a
  ``diffusers`` transformer, for instance), with the condition built once per image by a
  scenario-specific ``conditioner`` and classifier-free guidance from one batched call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unigrpo_env import flow
from unigrpo_env.agents.adapters import save_model
from unigrpo_env.agents.decoding import all_finished
from unigrpo_env.agents.policy import TextSample, TurnContext

__all__ = ["CausalLMTextPolicy", "ConditionedFlowPolicy", "PromptBuilder", "PromptText"]

PromptBuilder = Callable[[Sequence[str], Sequence[Sequence[int]]], list[int]]
#: Builds the text each episode's image is drawn from, out of its turn context (diffusers policies).
PromptText = Callable[[TurnContext], Sequence[str]]


class CausalLMTextPolicy(nn.Module):
    """A ``transformers`` causal LM as a :class:`~unigrpo_env.agents.policy.TextPolicy`.

    Args:
        model: the causal LM (``AutoModelForCausalLM``).
        prompt_ids: builds a context's token ids from its prompts and earlier reasoning
            (the model's chat format, e.g. ``scenarios.shapes.chat_prompt_ids``).
        eot_id: the end-of-thinking token, which ends a sampled segment.
        pad_id: the padding id of batched outputs.
    """

    def __init__(self, model: nn.Module, prompt_ids: PromptBuilder, eot_id: int, pad_id: int, tokenizer: Any = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.eot_id = int(eot_id)
        self.pad_id = int(pad_id)
        # transformers 5 renamed the KV cache argument and output from past_key_values to cache
        self._cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def save_pretrained(self, path: str) -> None:
        """Save the model (and its tokenizer, if given) with ``save_pretrained``; with a peft adapter,
        the model with the adapter merged (an ordinary checkpoint, written without a second copy)."""
        save_model(self.model, path)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)

    def context_ids(self, context: TurnContext) -> list[list[int]]:
        return [
            self.prompt_ids(context.prompts[i], [h.tolist() for h in context.history[i]]) for i in range(len(context))
        ]

    @torch.no_grad()
    def sample(
        self,
        context: TurnContext,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> TextSample:
        """Sample until ``</think>`` or ``max_new_tokens``; ``temperature == 0`` is greedy decoding.
        Log-probabilities are those of the sampling distribution (softmax of logits / temperature;
        of temperature 1 when greedy)."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        device = self.device
        contexts = self.context_ids(context)
        n, width = len(contexts), max(len(c) for c in contexts)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((n, width), dtype=torch.long, device=device)
        for i, c in enumerate(contexts):  # left padding: every row's next token is at the end
            ids[i, width - len(c) :] = torch.tensor(c, device=device)
            mask[i, width - len(c) :] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        tokens = torch.full((n, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        log_probs = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=device)
        lengths = torch.zeros(n, dtype=torch.long, device=device)
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        position = positions[:, -1:]
        for k in range(max_new_tokens):
            if bool(finished.all()):
                # done here, not yet in another process (synchronised decoding): keep joining the
                # sharded model's calls with padding, drawing no random numbers
                nxt = torch.full((n,), self.pad_id, dtype=torch.long, device=device)
            else:
                logits = out.logits[:, -1].float()
                logp = F.log_softmax(logits / (temperature or 1.0), dim=-1)
                if temperature == 0:
                    nxt = logp.argmax(-1)
                else:
                    nxt = torch.multinomial(logp.exp().cpu(), 1, generator=generator).squeeze(1).to(device)
                nxt = torch.where(finished, torch.full_like(nxt, self.pad_id), nxt)
                tokens[:, k] = nxt
                log_probs[:, k] = torch.where(
                    finished, torch.zeros_like(logits[:, 0]), logp.gather(1, nxt[:, None]).squeeze(1)
                )
                lengths += (~finished).long()
                finished |= nxt == self.eot_id
            if all_finished(finished) or k + 1 == max_new_tokens:  # under FSDP: in every process
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
            position = position + 1
            cache = {self._cache_name: getattr(out, self._cache_name)}
            out = self.model(
                input_ids=nxt[:, None], attention_mask=mask, position_ids=position, use_cache=True, **cache
            )
        width_out = int(lengths.max()) if n else 0
        return TextSample(tokens=tokens[:, :width_out], lengths=lengths, log_probs=log_probs[:, :width_out])

    def log_probs(
        self, context: TurnContext, tokens: torch.Tensor, lengths: torch.Tensor, *, temperature: float = 1.0
    ) -> torch.Tensor:
        """``log π_θ(tokens | context)`` ``[N, L]`` in one forward pass, with gradients.

        Rows are left-padded exactly as in :meth:`sample` (same positions), so on-policy the
        recomputation equals the sampled log-probabilities up to float rounding."""
        device = self.device
        tokens = tokens.to(device)
        lengths = lengths.to(device)
        contexts = self.context_ids(context)
        n, steps = tokens.shape
        width = max(len(c) for c in contexts)
        ids = torch.full((n, width + steps), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((n, width + steps), dtype=torch.long, device=device)
        for i, c in enumerate(contexts):
            ids[i, width - len(c) : width] = torch.tensor(c, device=device)
            mask[i, width - len(c) : width] = 1
        ids[:, width:] = tokens
        mask[:, width:] = (torch.arange(steps, device=device)[None] < lengths[:, None]).long()
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        predicting = logits[:, width - 1 : width - 1 + steps].float() / (temperature or 1.0)
        logp = F.log_softmax(predicting, dim=-1).gather(2, tokens[:, :, None]).squeeze(2)
        return logp * mask[:, width:].to(logp.dtype)


class ConditionedFlowPolicy(nn.Module):
    """A velocity model as a :class:`~unigrpo_env.agents.policy.FlowPolicy`.

    Args:
        model: called as ``model(x_t, t, **condition)`` with ``t`` ``[N]`` in ``[0, 1]``;
            returns the velocity ``[N, C, H, W]``.
        conditioner: builds the model's condition keyword arguments (tensors with a leading
            batch dimension, or None) from a :class:`~unigrpo_env.agents.policy.TurnContext`.
        unconditional: turns a condition into the unconditional one (for classifier-free guidance).
    """

    def __init__(
        self,
        model: nn.Module,
        conditioner: Callable[[TurnContext], dict[str, Any]],
        unconditional: Callable[[dict[str, Any]], dict[str, Any]],
    ):
        super().__init__()
        self.model = model
        self.conditioner = conditioner
        self.unconditional = unconditional

    def save_pretrained(self, path: str) -> None:
        """Save the model with ``save_pretrained`` (with a peft adapter, merged: :func:`save_model`)."""
        save_model(self.model, path)

    def condition(self, context: TurnContext) -> dict[str, Any]:
        device = next(self.model.parameters()).device
        place = getattr(self.conditioner, "to", None)  # a conditioner with networks runs beside the model
        if place is not None and getattr(self, "_conditioner_device", None) != device:
            place(device)
            self._conditioner_device = device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.conditioner(context).items()}

    def velocity(
        self, x_t: torch.Tensor, t: torch.Tensor | float, condition: dict[str, Any], *, cfg_scale: float = 1.0
    ) -> torch.Tensor:
        n = x_t.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).reshape(-1).expand(n)
        if cfg_scale == 1.0:
            return self.predict(x_t, t, condition)
        uncond = self.unconditional(condition)
        both = {k: _cat(condition[k], uncond[k]) for k in condition}
        v = self.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
        v_cond, v_uncond = v.chunk(2)
        return flow.cfg_velocity(v_cond, v_uncond, cfg_scale)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, condition: dict[str, Any]) -> torch.Tensor:
        """One network call: the velocity ``[N, C, H, W]`` at times ``t`` ``[N]`` in ``[0, 1]``
        (``model(x_t, t, **condition)``; a model with another signature overrides this)."""
        return self.model(x_t, t, **condition)

    def check_latent_shape(self, shape: tuple[int, ...]) -> None:
        """The model's own ``check_latent_shape``, where it has one (``ValueError`` if it cannot
        draw latents of ``shape``)."""
        check = getattr(self.model, "check_latent_shape", None)
        if check is not None:
            check(shape)


def _cat(a: Any, b: Any) -> Any:
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise ValueError("a condition and its unconditional version must both be tensors or both be None")
    return torch.cat([a, b])
