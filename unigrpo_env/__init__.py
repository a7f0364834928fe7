"""unigrpo-env: Gymnasium environments for RL of interleaved text-and-image generation.

One episode is one trajectory of text-token steps and flow-denoising steps with a terminal reward
(UniGRPO, arXiv 2603.23500, on top of Flow-GRPO, arXiv 2505.05470)::

    import gymnasium as gym
    import unigrpo_env

    env = gym.make("unigrpo/T2IReason-v0")            # or unigrpo_env.make("t2i_reason")
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(unigrpo_env.TextAction(tokens=[...]))
"""

from unigrpo_env import flow
from unigrpo_env.actions import FlowAction, TextAction
from unigrpo_env.batch_trajectory import BatchTrajectory, BatchTurn, ImageRecord, TextRecord
from unigrpo_env.codecs import ImageCodec, PixelCodec, TextCodec
from unigrpo_env.env import InterleavedEnv
from unigrpo_env.errors import (
    ActionDeviceError,
    ActionDTypeError,
    ActionShapeError,
    EpisodeEndedError,
    InvalidActionError,
    NonFiniteActionError,
    TaskSplitError,
    TokenBudgetError,
    TokenOutOfVocabularyError,
    WrongPhaseError,
)
from unigrpo_env.feedback import FeedbackError, TurnFeedback, TurnInputs
from unigrpo_env.observation import BatchObservation, Observation
from unigrpo_env.registration import make, make_scenario, make_vec, register_gym_ids
from unigrpo_env.reward import RewardFunction, RewardInputs, RewardOutput
from unigrpo_env.scenario import Scenario
from unigrpo_env.spaces import FlowActionSpace, InterleavedActionSpace, ObservationSpace, TextActionSpace
from unigrpo_env.task import Task
from unigrpo_env.trajectory import DenoisingStep, ImageSegment, TextSegment, Trajectory, Turn
from unigrpo_env.vae_codec import VAECodec
from unigrpo_env.vector import InterleavedVectorEnv
from unigrpo_env.world import World

__version__ = "0.1.0"

register_gym_ids()

__all__ = [
    "TurnInputs",
    "TurnFeedback",
    "FeedbackError",
    "flow",
    "TextAction",
    "FlowAction",
    "Observation",
    "BatchObservation",
    "Trajectory",
    "Turn",
    "TextSegment",
    "ImageSegment",
    "DenoisingStep",
    "BatchTrajectory",
    "BatchTurn",
    "TextRecord",
    "ImageRecord",
    "Task",
    "Scenario",
    "World",
    "TextCodec",
    "ImageCodec",
    "PixelCodec",
    "VAECodec",
    "InterleavedEnv",
    "InterleavedVectorEnv",
    "TextActionSpace",
    "FlowActionSpace",
    "InterleavedActionSpace",
    "ObservationSpace",
    "RewardFunction",
    "RewardInputs",
    "RewardOutput",
    "make",
    "make_vec",
    "make_scenario",
    "InvalidActionError",
    "WrongPhaseError",
    "ActionShapeError",
    "ActionDTypeError",
    "ActionDeviceError",
    "NonFiniteActionError",
    "TokenOutOfVocabularyError",
    "TokenBudgetError",
    "EpisodeEndedError",
    "TaskSplitError",
    "__version__",
]
