"""``UniGRPOConfig``: what a run trains on and every hyperparameter of UniGRPO (docs/design.md,
section 3), in one pydantic model.

Loadable from YAML or JSON (:meth:`UniGRPOConfig.from_file`) and overridable field by field (the
CLI's flags). A policy kind recommends its model's values (its loader's ``training_defaults``:
ShapesWorld's tuned recipe for ``shapes``, the paper's for ``hf``), and a scenario may add
task-specific ones (its ``training_defaults``, e.g. fewer iterations for a multi-turn scenario
whose iterations cost more): :meth:`UniGRPOConfig.for_scenario` layers them under the file and
the overrides, as ``unigrpo run`` does. The plain defaults train
every weight of both models; the paper's values for Bagel at 1024 px are given beside each field,
and how ShapesWorld's were chosen is in docs/experiments/.

Counting words: an *iteration* is one rollout of a batch plus its update (``iterations``,
``warmup_iterations``, ``checkpoint_every``); an *optimizer step* is one step of Adam (``ppo_epochs``
× ``minibatches`` per iteration); a *denoising step* is one step of an image's flow (the scenario
option ``num_steps``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from unigrpo_env.bounded_json import BoundedJSONError, check_tree, loads, shorten

__all__ = ["UniGRPOConfig", "ConfigError", "TEXT_LEARNING_RATES", "MAX_SEED", "RENAMED", "migrate_saved_config"]

#: The largest seed (seeds are integers in [0, 2^32 - 1], as numpy's and Python's conventions have
#: them; the agent derives its per-iteration torch seeds from it without overflowing 64 bits).
MAX_SEED = 2**32 - 1
#: The largest config file read (a config is a few kB).
MAX_CONFIG_BYTES = 2**20


#: The fields of earlier releases, the one place their migrations live: old name -> what replaced it.
#: A config file or flag that uses an old name is refused with this message; a saved run's
#: ``config.json`` is carried over (:func:`migrate_saved_config`), so ``--resume`` still works.
RENAMED: dict[str, str] = {
    "steps": "steps was renamed iterations (training iterations; num_steps in scenario_options are denoising steps)",
    "regularizer_weight": (
        "regularizer_weight was replaced by mse_weight (velocity MSE) and kl_weight (latent KL), one per regulariser"
    ),
}


def migrate_saved_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A run folder's ``config.json`` from an older release, in today's fields (see :data:`RENAMED`):
    ``steps`` becomes ``iterations``, and the shared ``regularizer_weight`` (None = the
    regulariser's default) becomes that regulariser's own weight."""
    saved = dict(saved)
    if "steps" in saved:
        saved["iterations"] = saved.pop("steps")
    if "regularizer_weight" in saved:
        weight = saved.pop("regularizer_weight")
        field = {"mse": "mse_weight", "kl": "kl_weight"}.get(saved.get("regularizer", "mse"))
        if weight is not None and field is not None:
            saved[field] = weight
    return saved


#: ``lr_text`` when none is given, by ``text_adapter``: the largest rates measured to keep ShapesWorld's
#: language model stable (docs/experiments/parameter-efficient-training.md).
TEXT_LEARNING_RATES: dict[str, float] = {"full": 1e-4, "lora": 1e-3, "ln_tuning": 3e-2}


class ConfigError(ValueError):
    """A configuration file or value that cannot be used."""


class UniGRPOConfig(BaseModel):
    # allow_inf_nan=False: every float field refuses NaN and infinities (a lora_alpha of .inf used
    # to pass and fail inside the first rollout, after the run folder was written)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # -- what to train, on what ------------------------------------------------------------
    scenario: str = "t2i_reason"
    scenario_options: dict[str, Any] = Field(default_factory=dict)
    policy: str | None = Field(
        default=None,
        description="the policy kind (a registered name or 'module:Name'); None = the scenario's default_policy",
    )
    policy_options: dict[str, Any] = Field(
        default_factory=dict, description="options of the policy kind's loader (e.g. text_model, image_model for 'hf')"
    )
    checkpoint: str | None = Field(
        default=None, description="the policy's checkpoint folder or hub id; None = the policy kind's default"
    )
    evaluator: str | None = Field(
        default=None,
        description="the held-out evaluator (a registered name or 'module:Name'); None = the scenario's default_evaluator",
    )
    train: Literal["both", "text", "image"] = Field(
        default="both", description="both = UniGRPO; text = TextGRPO only; image = FlowGRPO only"
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="seed of prompts, sampling and updates")
    text_adapter: Literal["full", "lora", "ln_tuning"] = Field(
        default="full",
        description="how the text side trains (peft): full = every weight; lora = low-rank updates of every linear layer; "
        "ln_tuning = only the normalisation layers",
    )
    image_adapter: Literal["full", "lora", "ln_tuning"] = Field(
        default="full",
        description="how the image side trains (peft): full, lora (the attention projections) or ln_tuning (the adaLN modulations)",
    )
    lora_rank: int = Field(default=8, ge=1, description="rank r of the LoRA adapters")
    lora_alpha: float = Field(default=16.0, gt=0.0, description="LoRA scale α (the update is (α/r)·B·A)")
    text_adapter_targets: list[str] | None = Field(
        default=None, description="module-name suffixes for the text adapter (None: agents.adapters.DEFAULT_TARGETS)"
    )
    image_adapter_targets: list[str] | None = Field(
        default=None, description="module-name suffixes for the image adapter (None: agents.adapters.DEFAULT_TARGETS)"
    )

    # -- rollouts ------------------------------------------------------------------------------
    iterations: int = Field(
        default=150, ge=1, description="training iterations (one rollout of a batch and its update each)"
    )
    num_prompts: int = Field(default=16, ge=1, description="prompts per iteration")
    group_size: int = Field(default=4, ge=2, description="rollouts per prompt (paper: 24)")
    images_per_text: int = Field(
        default=1,
        ge=1,
        description="M images drawn from each sampled reasoning (group_size / M texts per prompt); 1 is the paper's",
    )
    temperature: float = Field(default=1.0, gt=0.0, description="text sampling temperature (paper: 1)")
    noise_level: float = Field(default=0.7, gt=0.0, description="SDE noise level a (paper: 0.8; Flow-GRPO: 0.7)")
    sde_window_size: int | None = Field(
        default=3, ge=1, description="SDE steps per image, a window of consecutive steps (paper: 3); None = all"
    )
    sde_window_max_start: int = Field(
        default=4, ge=0, description="the window starts at a random step in [0, this] (paper: window in [0, 5])"
    )
    rollout_cfg: float = Field(
        default=1.0, ge=1.0, description="CFG scale during rollouts and training (1 = CFG-free, the paper's default)"
    )

    # -- the update ------------------------------------------------------------------------------
    ppo_epochs: int = Field(default=1, ge=1, description="passes over each batch (paper: 2)")
    minibatches: int = Field(default=1, ge=1, description="minibatches per PPO epoch")
    clip_range_text: float = Field(default=0.2, gt=0.0, description="GRPO clip ε for tokens")
    clip_range_image: float = Field(
        default=1e-3, gt=0.0, description="Flow-GRPO clip ε for steps (paper: 1e-6 Bagel; Flow-GRPO: 1e-4)"
    )
    image_loss_weight: float = Field(default=1.0, ge=0.0, description="λ in J = J_text + λ·J_flow (paper: 1)")
    ratio_norm: bool = Field(default=False, description="GRPO-Guard's RatioNorm on the image ratios")
    global_std: bool = Field(default=False, description="flow_grpo's global-std advantages instead of per-group std")
    advantage_eps: float = Field(default=1e-4, gt=0.0)
    advantage: Literal["trajectory", "turn", "batch"] = Field(
        default="trajectory",
        description=(
            "how turn rewards (Scenario.respond) enter the advantages: 'trajectory' (the terminal reward plus every "
            "turn reward, normalised per group, shared by every turn; without turn rewards, GRPO's), 'turn' (the "
            "discounted return-to-go from each turn, normalised per group and turn over the rows that played it) "
            "or 'batch' (the return-to-go normalised over the whole batch, GEM's ReBN)"
        ),
    )
    turn_discount: float = Field(default=1.0, ge=0.0, le=1.0, description="γ of the return-to-go ('turn', 'batch')")
    regularizer: Literal["mse", "kl", "none"] = Field(
        default="mse", description="velocity MSE (UniGRPO), latent KL (Flow-GRPO) or none"
    )
    mse_weight: float = Field(
        default=1.0, ge=0.0, description="β of the velocity MSE when regularizer is mse (UniGRPO: 1)"
    )
    kl_weight: float = Field(
        default=0.04, ge=0.0, description="β of the latent KL when regularizer is kl (Flow-GRPO: 0.04)"
    )
    text_loss_type: Literal["grpo", "bnpo", "dr_grpo"] = Field(
        default="grpo",
        description="how the text loss averages tokens (TRL's loss_type): grpo = per sequence, then over sequences; "
        "bnpo = over all tokens of the batch; dr_grpo = each sequence's sum over the token budget",
    )
    kl_text: float = Field(
        default=0.0,
        ge=0.0,
        description="β of GRPO's per-token KL (k3) to the starting language model (paper: 0; DeepSeekMath: 0.04)",
    )
    lr_text: float | None = Field(
        default=None,
        gt=0.0,
        description="learning rate of the text parameters (paper: 1e-6 at 7B); None = TEXT_LEARNING_RATES[text_adapter]",
    )
    lr_image: float = Field(
        default=1e-4, gt=0.0, description="learning rate of the image parameters (paper: 3e-5 at 7B)"
    )
    warmup_iterations: int = Field(
        default=0, ge=0, description="learning rates rise linearly from lr/warmup to lr over the first iterations"
    )
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        default="constant",
        description="learning rates after the warm-up: constant, or decaying to 0 at the last iteration (linear, cosine)",
    )
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)

    # -- reward failures -------------------------------------------------------------------------
    max_failed_fraction: float = Field(
        default=0.5, ge=0.0, le=1.0, description="stop when more of a batch than this has no reward"
    )

    # -- running -------------------------------------------------------------------------------
    eval_split: str = "heldout"
    eval_cfg: float = Field(
        default=1.0,
        ge=1.0,
        description="CFG scale of the held-out evaluations before and after (1 = none; the CFG ablation evaluates both arms with CFG)",
    )
    eval_limit: int | None = Field(default=None, ge=1, description="evaluate on the first N held-out tasks only")
    checkpoint_every: int = Field(default=10, ge=1, description="iterations between checkpoints")
    reward_timeout: float | None = Field(
        default=600.0,
        gt=0.0,
        description="seconds a reward may take for one batch; a scorer that hangs longer gives NaN scores and a warning (None: no limit)",
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = Field(
        default=None,
        description="Accelerate's mixed precision (the flow math stays float32); None: the launcher's "
        "(accelerate launch's config file, ACCELERATE_MIXED_PRECISION), else no",
    )
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, description="Accelerate's: optimizer steps accumulated into one"
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="recompute the trained networks' activations in the backward pass: less memory, about one more forward pass",
    )
    cpu: bool = Field(default=False, description="run on the CPU even where a GPU is present")

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for old in RENAMED:
            if old in data:
                raise ValueError(RENAMED[old])
        return data

    @field_validator("scenario_options", "policy_options")
    @classmethod
    def _bounded_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        # options are free-form: their numbers are checked here (finite), and their size and depth
        check_tree(options, what="the options", max_nodes=None)
        return options

    @model_validator(mode="after")
    def _text_rate(self) -> UniGRPOConfig:
        # lr_text not given: the rate measured for the text adapter, resolved again whenever the
        # adapter changes (also by assignment), so it never keeps the rate of an adapter no longer used.
        if self.lr_text is None or "lr_text" not in self.model_fields_set:
            self.__dict__["lr_text"] = TEXT_LEARNING_RATES[self.text_adapter]
        return self

    @model_validator(mode="after")
    def _consistent(self) -> UniGRPOConfig:
        if self.minibatches > self.num_prompts * self.group_size:
            raise ValueError(
                f"minibatches ({self.minibatches}) exceeds the batch ({self.num_prompts}×{self.group_size})"
            )
        m = self.images_per_text
        if m > 1 and (self.group_size % m or (self.train != "image" and self.group_size // m < 2)):
            raise ValueError(
                f"images_per_text ({m}) must divide group_size ({self.group_size}) and leave at least 2 texts per "
                "prompt to compare (group_size / images_per_text >= 2)"
            )
        if m > 1 and self.advantage != "trajectory":
            raise ValueError(
                f"images_per_text ({m}) shares each text's advantage over its images: it takes advantage='trajectory', "
                f"not {self.advantage!r}"
            )
        return self

    @property
    def regularizer_coef(self) -> float:
        """β of the chosen regulariser."""
        return {"mse": self.mse_weight, "kl": self.kl_weight, "none": 0.0}[self.regularizer]

    @classmethod
    def for_scenario(cls, scenario: str, path: str | Path | None = None, **overrides: Any) -> UniGRPOConfig:
        """The config of a run on ``scenario``, layered: the defaults; the policy kind's recipe (its
        loader's ``training_defaults``: the model's learning rates, clip ranges, regulariser
        weights; the kind is ``policy`` from the overrides or the file, else the scenario's
        ``default_policy``); the scenario's task-specific ``training_defaults`` (e.g. fewer
        iterations where an iteration plays three turns); the file at ``path`` (if any); then
        ``overrides``."""
        from unigrpo_env.agents.parts import policy_training_defaults
        from unigrpo_env.registration import SCENARIOS

        data = cls._read(path) if path is not None else {}
        kind = overrides.get("policy", data.get("policy"))
        recipe = policy_training_defaults(kind, scenario=scenario)
        task = dict(getattr(SCENARIOS.get(scenario), "training_defaults", None) or {})
        return cls.model_validate({**recipe, **task, **data, "scenario": scenario, **overrides})

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> UniGRPOConfig:
        """Read a YAML or JSON file; ``overrides`` (e.g. from CLI flags) win."""
        return cls.model_validate({**cls._read(path), **overrides})

    @staticmethod
    def _read(path: str | Path) -> dict[str, Any]:
        """A config file's mapping of options, read within bounds (:mod:`unigrpo_env.bounded_json`):
        UTF-8, at most 100 levels deep, finite numbers, and for YAML at most 100,000 values with
        every alias counted as what it repeats (an alias bomb is refused, not expanded)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {str(path)!r} is larger than {MAX_CONFIG_BYTES} bytes")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"config file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
                check_tree(data, what="the config")
            else:
                data = loads(text, what="the config")
        except BoundedJSONError as exc:
            raise ConfigError(f"{str(path)!r}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any parse error is a bad config file
            raise ConfigError(f"could not parse {str(path)!r}: {shorten(str(exc))}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{str(path)!r} must hold a mapping of options, got {type(data).__name__}")
        return data
