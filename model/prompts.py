"""MetaICL prompt formats, built directly as token ids.

direct:  [instruction] x1 \\n y1 \\n\\n ... xk \\n yk \\n\\n | x \\n | y    (score y given x)
channel: [instruction] y1 \\n x1 \\n\\n ... yk \\n xk \\n\\n | y \\n | x    (score x given y)

Every sequence is prefix (instruction + demonstrations, shared by all queries of a task) +
ctx + target; the loss or score is on target tokens only. Pieces are tokenized separately
and concatenated, so train-time and test-time token boundaries are identical and a
task's prefix can be encoded once and reused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from model.task import Example

FORMATS = ("direct", "channel")


class PromptTooLong(ValueError):
    """Even with no demonstrations, the query and an option do not fit the context budget."""


@dataclass(frozen=True)
class Row:
    ctx: list[int]  # conditioning tokens after the prefix (never empty)
    target: list[int]  # tokens scored / trained on


@dataclass
class Formatter:
    encode: Callable[[str], list[int]]
    fmt: str = "direct"
    budget: int = 1024  # prompt tokens: prefix + ctx + target

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"prompt format must be one of {FORMATS}, got {self.fmt!r}")
        self.nl = self.encode("\n")
        self.sep = self.encode("\n\n")

    def row(self, text: str, answer: str) -> Row:
        """The (ctx, target) pair for an input and one candidate answer."""
        x, y = self.encode(text), self.encode(answer)
        if self.fmt == "direct":
            return Row(x + self.nl, y)
        return Row(y + self.nl, x)

    def demo(self, ex: Example) -> list[int]:
        r = self.row(ex.input, ex.output)
        return r.ctx + r.target + self.sep

    def instruction(self, text: str | None) -> list[int]:
        return self.encode(text) + self.sep if text else []

    def prefix(self, instruction: str | None, demos: Sequence[Example], longest_row: int = 0) -> tuple[list[int], int]:
        """Instruction + as many demonstrations as fit beside the longest row; returns (ids, demos used).

        Demonstrations are dropped from the end to fit; the query and options are never cut.
        """
        head = self.instruction(instruction)
        room = self.budget - longest_row
        if room < 0:
            raise PromptTooLong(f"the query needs {longest_row} tokens; the context budget is {self.budget}")
        if len(head) > room:
            head = []  # the instruction goes before the query does (with demonstrations or without)
        ids, used = list(head), 0
        for ex in demos:
            d = self.demo(ex)
            if len(ids) + len(d) > room:
                break
            ids += d
            used += 1
        return ids, used

    def candidates(self, text: str, options: Sequence[str]) -> list[Row]:
        return [self.row(text, o) for o in options]


def longest(rows: Sequence[Row]) -> int:
    return max((len(r.ctx) + len(r.target) for r in rows), default=0)
