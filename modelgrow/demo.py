"""`modelgrow demo`: the whole job on the small GPT-2 that ships with the package.

The checkpoint was pretrained on the Python standard library's source by
scripts/make_demo_checkpoint.py (settings and losses in data/demo/training.json).
"""

from __future__ import annotations

import tempfile
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from . import api
from .summaries import format_plan, format_verify
from .source import load_module, open_source

PROMPT = "for i in "


def demo_checkpoint() -> Path:
    return Path(str(resources.files("modelgrow.data.demo")))


@torch.no_grad()
def greedy(source, module: torch.nn.Module, ids: list[int], steps: int) -> list[int]:
    out = list(ids)
    for _ in range(steps):
        logits = source.arch.call(module, source.config, {"input_ids": torch.tensor([out])})
        out.append(int(logits[0, -1].argmax()))
    return out[len(ids):]


def run_demo(output: str | Path | None, *, overwrite: bool = False, echo: Callable = print, progress: bool = False) -> dict:
    from tokenizers import Tokenizer

    src = demo_checkpoint()
    with tempfile.TemporaryDirectory(prefix="modelgrow-demo-") as tmp:
        dest = Path(output) if output else Path(tmp) / "grown"
        echo(f"growing the shipped demo GPT-2 ({src}) 2x wide and 2x deep ...")
        result = api.convert(src, dest, width="2x", depth="2x", verify=True, overwrite=overwrite, progress=progress)
        report = result.to_dict()
        echo(format_plan(report))
        echo(format_verify(report["verify"]))
        tok = Tokenizer.from_file(str(src / "tokenizer.json"))
        ids = tok.encode(PROMPT).ids
        with open_source(src) as small_src, open_source(dest) as big_src:
            small, big = load_module(small_src), load_module(big_src)
            a, b = greedy(small_src, small, ids, 32), greedy(big_src, big, ids, 32)
        echo(f"prompt: {PROMPT!r}")
        echo(f"small model continues: {tok.decode(a)!r}")
        echo(f"grown model continues: {tok.decode(b)!r}")
        echo("same continuation: " + ("yes" if a == b else "NO"))
        if output:
            echo(f"grown checkpoint kept in {dest}")
        report["demo"] = {"prompt": PROMPT, "same_continuation": a == b}
        return report
