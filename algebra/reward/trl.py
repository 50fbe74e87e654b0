"""A reward as a Python callable with TRL's reward-function signature.

    r = Interpreter().eval('sum(logsig(help - quantile(help, refs, 0.85)), ...)', ...)
    trainer = GRPOTrainer(..., reward_funcs=[r])

TRL calls `r(prompts=[...], completions=[...], completion_ids=..., trainer_state=...,
**dataset_columns)` and logs it by `r.__name__`. Prompts and completions are strings
(standard format) or lists of chat messages (conversational format: a completion is a
list whose last message's content is the response; a prompt is the conversation so far,
given whole to a reward model's chat template). Reward models stay loaded between calls
(loaded one at a time on the first call that needs them), scores are cached, and
baselines and normalisation statistics are fixed once computed.

Names: after the recipe's binding (`r = ...` logs as `r`), else distinct. Pickling and
deepcopy carry the recipe (`Recipe`: the interpreter's evals and bindings), not models:
the copy checks the recipe again and loads what it needs on first call.
"""

from __future__ import annotations

import itertools
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import AlgTypeError
from ..options import Options, picklable_options
from .data import prompt_key, response_text
from .values import Reward

_UNNAMED = itertools.count(1)


def reward_name(env: dict[str, Any], value: Reward, text: str) -> str:
    """A reward function's name (TRL logs `rewards/<name>/mean`): the name the recipe's
    last statement binds or names (`r = ...`, `r`), else any name bound to this value
    (the latest), else a distinct `alg_reward_<n>`."""
    name = _last_name(text)
    if name is not None and env.get(name) is value:
        return name
    bound = [n for n, v in env.items() if v is value]
    return bound[-1] if bound else f"alg_reward_{next(_UNNAMED)}"


def _last_name(text: str) -> str | None:
    """The name that the last statement of `text` binds (`r = ...`) or is (`r`)."""
    last = text.replace(";", "\n").strip().splitlines()[-1] if text.strip() else ""
    m = re.match(r"\s*([A-Za-z_]\w*)\s*(?:=(?!=)|$)", last)
    return m.group(1) if m else None


def assigned_reward(env: dict[str, Any], text: str) -> Reward | None:
    """The reward that the last statement of `text` binds, if it binds one."""
    name = _last_name(text)
    v = env.get(name) if name is not None else None
    return v if isinstance(v, Reward) else None


class ResultRef:
    """A checkpoint binding (an `alg.Result`) in a recipe: replayed by its source text."""

    def __init__(self, text: str):
        self.text = text


@dataclass(frozen=True)
class Recipe:
    """What rebuilds a reward in another process: the interpreter's options and folder,
    and every `eval` it ran (source, bindings), the last one giving the reward. Replayed
    by checking alone, so no sink of an earlier eval runs again."""

    options: Options
    base_dir: str
    history: tuple[tuple[str, dict[str, Any]], ...]
    index: tuple[int, ...] = ()  # where the reward is in the last eval's value (a list of rewards)

    # rebuilds the reward from this recipe (interpreter.replay_recipe, a module-level
    # function, so a recipe pickles by reference to it)
    replay: Callable[[Recipe], Reward] | None = None

    def build(self) -> Reward:
        if self.replay is None:
            raise AlgTypeError("this reward function's recipe cannot be replayed")
        return self.replay(self)


def _rebuild(recipe: Recipe, name: str) -> RewardFunction:
    return RewardFunction(recipe.build(), recipe.options, name, recipe)


class RewardFunction:
    def __init__(self, reward: Reward, options: Options, name: str, recipe: Recipe | None = None):
        self.reward = reward
        self.__name__ = name
        self.options = options
        self.recipe = recipe
        self._run_state = None

    @property
    def _run(self):
        if self._run_state is None:  # created on the first call: a copy sent elsewhere loads there
            from .engine import RewardRun

            self._run_state = RewardRun(self.options, out=lambda _line: None, keep_loaded=True)
        return self._run_state

    def __reduce__(self):
        # pickle and deepcopy (TRL's async GRPO sends reward_funcs to another process): the
        # recipe travels, and the other side checks it again and loads its own models
        if self.recipe is None:
            raise AlgTypeError(f"{self.__name__}: this reward function was not made by Interpreter.eval, "
                               "so it has no recipe to send to another process")
        for _text, bindings in self.recipe.history:
            for name, value in bindings.items():
                try:
                    pickle.dumps(value)
                except Exception as e:
                    raise AlgTypeError(f"{self.__name__}: its binding '{name}' ({type(value).__name__}) "
                                       f"cannot be pickled: {e}") from None
        return (_rebuild, (self.recipe, self.__name__))

    def __repr__(self) -> str:
        return f"<alg reward {self.__name__}: {self.reward}>"

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise AlgTypeError(f"{self.__name__}: {len(prompts)} prompts but {len(completions)} completions")
        points = []
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            pk, ct = prompt_key(p), response_text(c)
            if pk is None or ct is None:
                raise AlgTypeError(f"{self.__name__}: item {i}: prompts and completions must be strings "
                                   "or lists of {'role', 'content'} messages (content: text, None or a "
                                   "list of typed blocks)")
            points.append((pk, ct))
        self._run.ensure([(self.reward, points)])
        return [float(v) for v in self._run.values(self.reward, points)]

    @property
    def texts_scored(self) -> int:
        """Texts scored by a model so far (cache hits excluded)."""
        return self._run.scored


__all__ = ["Recipe", "ResultRef", "RewardFunction", "assigned_reward", "picklable_options", "reward_name"]
