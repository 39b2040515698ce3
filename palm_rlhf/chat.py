"""Talking to a trained model: `palm-rlhf sample` prints continuations, `palm-rlhf chat` is an
interactive terminal loop that streams the answer as it is sampled.

The chat prompt follows the Human/Assistant template of the HH-RLHF data the reward model is
trained on. The conversation is kept in token ids; when it would not fit the model's context
window with room for the answer, the oldest turns are dropped (whole turns first).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable, TextIO

import torch

from palm_rlhf.model.sampling import iter_sample
from palm_rlhf.model.sampling_options import GenerationOptions, with_defaults
from palm_rlhf.options import option
from palm_rlhf.train.loading import load_base


@dataclass
class SampleConfig(with_defaults(GenerationOptions, max_new_tokens=200, temperature=0.8, top_k=40)):
    checkpoint: str = option(
        "",
        "model: a checkpoint folder, a run folder (its latest) or a .safetensors file",
        required=True,
    )
    prompt: str = option("", "text to continue (empty: start from the EOS token)")
    num_samples: int = option(1, "how many continuations")
    stop_at_eos: bool = option(True, "stop a continuation at the EOS token")
    seed: int = option(0, "random seed")


@dataclass
class ChatConfig(with_defaults(GenerationOptions, temperature=0.7, top_k=40)):
    checkpoint: str = option(
        "",
        "model: a checkpoint folder, a run folder (its latest) or a .safetensors file",
        required=True,
    )
    human_prefix: str = option("\n\nHuman: ", "text before each of your turns")
    assistant_prefix: str = option("\n\nAssistant:", "text before each answer")
    seed: int = option(0, "random seed")


class ChatSession:
    """A conversation with a model; `respond` streams the answer's text piece by piece."""

    def __init__(self, model, tokenizer, config: ChatConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        # prompt tokens that fit beside the answer; refuses a too long --max-new-tokens
        self.budget = config.prompt_budget(model.config.max_seq_len)
        self.turns: list[list[int]] = []  # token ids of each finished turn (human or assistant)
        self.generator = torch.Generator(device=model.device).manual_seed(config.seed)

    def reset(self) -> None:
        self.turns = []

    def _human_turn(self, message: str) -> list[int]:
        encode = self.tokenizer.encode
        return encode(self.config.human_prefix + message) + encode(self.config.assistant_prefix)

    def _fit(self, human: list[int]) -> list[int]:
        """History + this turn, within the window less room for the answer."""
        while self.turns and sum(map(len, self.turns)) + len(human) > self.budget:
            self.turns.pop(0)  # forget the oldest turn first
        prompt = [t for turn in self.turns for t in turn] + human
        return prompt[-self.budget :]  # a single overlong message keeps its end

    def respond(self, message: str) -> Iterator[str]:
        """Sample an answer, yielding its text as it grows; the turn then joins the history."""
        config, tokenizer = self.config, self.tokenizer
        human = self._human_turn(message)
        prompt = torch.tensor([self._fit(human)], device=self.model.device)
        stop = config.human_prefix.rstrip()  # the model starting the next human turn itself
        tokens = iter_sample(
            self.model,
            prompt,
            config.max_new_tokens,
            **config.sample_kwargs(),
            eos_token=tokenizer.eos_id,
            generator=self.generator,
        )
        answer, shown, stopped = [], "", False
        for token in tokens:
            if int(token[0]) == tokenizer.eos_id:
                break
            answer.append(int(token[0]))
            visible, stopped = visible_text(tokenizer.decode(answer), stop)
            if len(visible) > len(shown):
                yield visible[len(shown) :]
                shown = visible
            if stopped:
                break
        final = shown if stopped else tokenizer.decode(answer)
        if len(final) > len(shown):
            yield final[len(shown) :]
        self.turns += [human, tokenizer.encode(final)]


def visible_text(text: str, stop: str) -> tuple[str, bool]:
    """The part of a growing answer that is safe to print, and whether `stop` was reached.

    Held back: a trailing replacement character (the bytes of a character still being
    sampled) and a tail that may be the beginning of `stop`.
    """
    if stop and stop in text:
        return text[: text.index(stop)], True
    text = text.rstrip("\ufffd")
    hold = max((k for k in range(len(stop), 0, -1) if text.endswith(stop[:k])), default=0)
    return text[: len(text) - hold], False


def chat_loop(
    session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout
) -> None:
    """Read a line, stream the answer, repeat; Ctrl-D (end of input) or Ctrl-C quits."""
    out.write("palm-rlhf chat. Ctrl-D quits, /reset forgets the conversation.\n")
    out.flush()
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            out.flush()
            return
        if not line.strip():
            continue
        if line.strip() == "/reset":
            session.reset()
            out.write("(conversation forgotten)\n")
            continue
        out.write("bot>")
        out.flush()
        for piece in session.respond(line):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()


def run_chat(config: ChatConfig) -> None:
    model, tokenizer = load_base(config.checkpoint, log=lambda *_: None)
    chat_loop(ChatSession(model.eval(), tokenizer, config))


def run_sample(config: SampleConfig) -> list[str]:
    model, tokenizer = load_base(config.checkpoint, log=lambda *_: None)
    generator = torch.Generator().manual_seed(config.seed)
    prompt = tokenizer.encode(config.prompt) if config.prompt else [tokenizer.eos_id]
    prompt = config.fit_prompt(prompt, model.config.max_seq_len)
    texts = []
    for index in range(config.num_samples):
        tokens = iter_sample(
            model,
            torch.tensor([prompt]),
            config.max_new_tokens,
            **config.sample_kwargs(),
            generator=generator,
            eos_token=tokenizer.eos_id if config.stop_at_eos else None,
        )
        ids = [int(t[0]) for t in tokens]
        if config.stop_at_eos and tokenizer.eos_id in ids:
            ids = ids[: ids.index(tokenizer.eos_id)]
        texts.append(tokenizer.decode(ids))
        print(f"--- sample {index + 1} ---\n{config.prompt}{texts[-1]}")
    return texts
