"""modelgrow plugin: nanoGPT-style checkpoints. One JSON layout plus these few lines."""

from __future__ import annotations

from importlib import resources

from modelgrow.architecture import Architecture
from modelgrow.hookspecs import hookimpl
from modelgrow.layout import Layout

__version__ = "0.1.0"

LAYOUT_FILE = resources.files(__name__).joinpath("nanogpt.json")


class NanoGPT(Architecture):
    """The layout says what every tensor is; this class only says how to run the model."""

    def build_module(self, config):
        from .model import GPT

        dims, args = self.layout.dims(config), config["model_args"]
        module = GPT(n_layer=dims.layers, n_head=dims.heads, n_embd=dims.residual, block_size=dims.positions,
                     vocab_size=dims.vocab, bias=bool(args.get("bias", True)), eps=float(args.get("norm_eps", 1e-5)))
        return module.float().eval()


@hookimpl
def register_architectures(register):
    register(NanoGPT(Layout.from_file(str(LAYOUT_FILE))))
