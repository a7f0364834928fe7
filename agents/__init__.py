"""The UniGRPO agent and what it trains: the policy protocol, rollouts, losses, the trainer.

    from unigrpo_env.agents import Trainer, UniGRPOAgent, UniGRPOConfig, build_parts

``UniGRPOConfig`` holds the hyperparameters; ``UniGRPOAgent`` runs iterations (collect a batch of
grouped rollouts, update on the joint loss); ``Trainer`` runs an agent for a number of iterations
into a run folder, from the parts it is given (``build_parts`` makes the parts a config names).
"""

from unigrpo_env.agents.config import ConfigError, UniGRPOConfig
from unigrpo_env.agents.evaluation import EpisodeMetric, EvalReport, Evaluator
from unigrpo_env.agents.parts import (
    EVALUATORS,
    POLICIES,
    PRETRAINERS,
    RunParts,
    build_evaluator,
    build_parts,
    load_policy,
    register_evaluator,
    register_policy,
)
from unigrpo_env.agents.policy import CheckpointError, FlowPolicy, TextPolicy, TextSample, TurnContext, UnifiedPolicy
from unigrpo_env.agents.rollout import Rollout, RolloutSettings, rollout
from unigrpo_env.agents.trainer import RunFolderError, Trainer, load_run_config
from unigrpo_env.agents.unigrpo import RewardFailureError, UniGRPOAgent

__all__ = [
    "UniGRPOConfig",
    "ConfigError",
    "UniGRPOAgent",
    "RewardFailureError",
    "Trainer",
    "RunFolderError",
    "load_run_config",
    "Evaluator",
    "EvalReport",
    "EpisodeMetric",
    "UnifiedPolicy",
    "TextPolicy",
    "FlowPolicy",
    "TextSample",
    "TurnContext",
    "CheckpointError",
    "Rollout",
    "RolloutSettings",
    "rollout",
    "POLICIES",
    "EVALUATORS",
    "PRETRAINERS",
    "register_policy",
    "register_evaluator",
    "load_policy",
    "build_evaluator",
    "build_parts",
    "RunParts",
]
