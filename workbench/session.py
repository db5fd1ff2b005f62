"""Session: a prompt, then one token per `step()`, on the cached or the uncached path over the same weights.

- cached: prefill the prompt in one batched forward, then each step feeds only the newest token and reads
  the K/V of everything before it from the cache.
- uncached: each step runs the whole sequence from scratch with a fresh cache, the way an engine without a
  KV cache works. It is the same forward pass, so any difference between the paths is a cache bug.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from workbench.errors import InputError
from workbench.model import Model, Probe

PATHS = ("cached", "uncached")


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (the default); top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and self.temperature < float("inf")):
            raise InputError(f"temperature must be a finite number ≥ 0, not {self.temperature}.")
        if self.top_k < 0:
            raise InputError(f"top-k must be ≥ 0 (0 switches it off), not {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top-p must be in (0, 1], not {self.top_p}.")

    def choose(self, logits: torch.Tensor, generator: torch.Generator) -> int:
        """The next token from logits [vocab] (float32)."""
        if self.temperature == 0:
            return int(torch.argmax(logits))
        scores = logits / self.temperature
        if self.top_k:
            kth = torch.topk(scores, min(self.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(sorted_scores, -1).cumsum(-1)
            # Drop a token when the tokens before it already reach top_p; the first token always stays.
            drop = cumulative - torch.softmax(sorted_scores, -1) >= self.top_p
            scores = scores.index_put((order[drop],), torch.tensor(float("-inf"), device=scores.device))
        probs = torch.softmax(scores, -1).cpu()
        return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class StepResult:
    token_id: int
    position: int  # where the new token will sit in the sequence
    seconds: float  # wall time of the forward (prefill included on the first cached step)
    logits: torch.Tensor  # [vocab] float32, on the model's device
    prefill: bool  # this step ran the cached path's prompt prefill
    stop: str | None = None  # "eos" | "context" when generation should end after this token


@dataclass
class Session:
    model: Model
    prompt_ids: list[int]
    path: str = "cached"
    sampling: Sampling = field(default_factory=Sampling)
    context: int | None = None  # positions the session may fill; default: the model's context, capped at 4096

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise InputError(f"unknown path '{self.path}'; choose one of: {', '.join(PATHS)}.")
        cfg = self.model.config
        if not self.prompt_ids:
            raise InputError("the prompt is empty and this model adds no BOS token: give at least one token.")
        for t in self.prompt_ids:
            if not 0 <= t < cfg.vocab_size:
                raise InputError(f"token id {t} is outside the vocabulary (0..{cfg.vocab_size - 1}).")
        capacity = self.context or min(cfg.context_length, 4096)
        if capacity > cfg.context_length:
            raise InputError(f"a context of {capacity} exceeds the model's {cfg.context_length} positions.")
        if len(self.prompt_ids) >= capacity:
            raise InputError(
                f"the prompt has {len(self.prompt_ids)} tokens, which leaves no room to generate in a context of {capacity}."
            )
        self.capacity = capacity
        self.ids: list[int] = list(self.prompt_ids)
        self.cache = self.model.new_cache(capacity) if self.path == "cached" else None
        self._fed = 0  # how many of self.ids the cached path has run through the model
        self.generator = torch.Generator().manual_seed(self.sampling.seed)

    @property
    def n_generated(self) -> int:
        return len(self.ids) - len(self.prompt_ids)

    def next_logits(self, probe: Probe | None = None) -> torch.Tensor:
        """Logits [vocab] for the token after self.ids, by this session's path."""
        m = self.model
        if self.path == "cached":
            new = torch.tensor(self.ids[self._fed :], device=m.device)
            logits = m.forward(new, self._fed, self.cache, probe, last_only=True)[-1]
            self._fed = len(self.ids)
            return logits
        cache = m.new_cache(len(self.ids))
        return m.forward(torch.tensor(self.ids, device=m.device), 0, cache, probe, last_only=True)[-1]

    def step(self, probe: Probe | None = None) -> StepResult:
        """Choose and append one token. Raises InputError when the context is already full."""
        if len(self.ids) >= self.capacity:
            raise InputError(f"the context is full ({self.capacity} positions); reset the session to go on.")
        prefill = self.path == "cached" and self._fed == 0
        t0 = time.perf_counter()
        logits = self.next_logits(probe)
        token = self.sampling.choose(logits, self.generator)  # reading the token synchronises the device
        seconds = time.perf_counter() - t0
        position = len(self.ids)
        self.ids.append(token)
        stop = None
        if token in self.model.tokenizer.eos_ids:
            stop = "eos"
        elif len(self.ids) >= self.capacity:
            stop = "context"
        return StepResult(token, position, seconds, logits, prefill, stop)

    def generate(self, steps: int) -> Iterator[StepResult]:
        """Up to `steps` tokens; stops after EOS or when the context is full (the last result says which)."""
        if steps < 0:
            raise InputError(f"steps must be ≥ 0, not {steps}.")
        for _ in range(steps):
            result = self.step()
            yield result
            if result.stop:
                return
