"""A peer tool with a known memory appetite, measured by ``dipreg.bench.peers_worker`` in a fresh interpreter.

``python tests/hungry_worker.py DIR``: saves the tiny Llama, the tiny tokenizer and the tiny pairs (``conftest``) into
``DIR``, then prints the JSON of ``peers_worker.measure`` for the tool ``hungry``: a build that touches 400 MB and
frees it, then runs that hold 64 MB each, the first of which also builds a 200 MB cache it keeps. Started at
collection by the ``memory_worker`` fixture (``conftest``); read by ``test_bench_peers``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from conftest import TINY_PAIRS, make_tiny_model, make_tiny_tokenizer

from dipreg.bench import peers_tools, peers_worker
from dipreg.stimuli import save_pairs


class Hungry:
    """The tool's lens: its appetite is the point, its margins are not."""

    lenses = ("logit",)

    def __init__(self, *_args: object) -> None:
        torch.ones(100 * 2**20).sum()  # 400 MB, freed at once: a peak before the run

    def margins(self, lens: str) -> torch.Tensor:
        if not hasattr(self, "cache"):
            self.cache = torch.ones(50 * 2**20)  # 200 MB touched by the first run only, and kept (a first-use cost)
        block = torch.ones(16 * 2**20)  # 64 MB held during every run
        return block[:1]


class HungryTool:
    """Builds :class:`Hungry` as ``peers_tools`` builds every tool."""

    def build(self, *args: object) -> Hungry:
        return Hungry(*args)


def main(folder: Path) -> None:
    make_tiny_model("llama").save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    pairs = save_pairs(TINY_PAIRS, folder / "pairs.jsonl")
    peers_tools.TOOLS["hungry"] = HungryTool()
    measured = peers_worker.measure(str(folder), str(pairs), "hungry", "logit", 4, "king king\n?", "float32", "cpu")
    print(json.dumps(measured))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
