"""Architectures: a layout (what the tensors are) plus the runtime contract (how to run
the model). Growth needs only the layout; verify, fit, train and export go through the
contract below and nothing else, so a plugin that implements ``build_module`` runs
through every command. The Hugging Face specifics live in ``architectures/hf.py``.

The contract, each method with a default a plugin may override:

- ``build_module(config)``: a torch module in fp32 (required to run anything);
- ``load_weights(module, tensors, source)``: tensors named as in the checkpoint;
- ``example_inputs(config, batch, seq, generator)``: random inputs (tokens or images);
- ``model_inputs(config, batch)``: the keyword arguments a loss step passes;
- ``call(module, config, inputs)``: run the module, return its primary output tensor;
- ``prepare_for_training(module, config)``: switch off what a training step does not
  want (a KV cache, say); ``prepare_for_export(module, config)``: what an exporter needs;
- ``tied_parameters(config)``: which stored tensors share a parameter (from the layout);
  ``parameter_views(module, shapes)``: where training finds each stored tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import InputError, LayoutError
from .layout import Layout, config_get


class Architecture:
    """Base class. A plugin author subclasses it (or uses it as is, layout only)."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.name = layout.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    # -- recognising a checkpoint ---------------------------------------------------

    def claims(self, config: dict, tensor_names: list[str]) -> bool:
        return self.layout.claims(config)

    def class_name(self, config: dict) -> str | None:
        names = config.get("architectures") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InputError(f"config 'architectures' must be a list of class names, got {names!r}")
        if names and names[0] in self.layout.classes:
            return names[0]
        if names and self.layout.classes:
            raise LayoutError(
                f"model class {names[0]!r} is not supported by the {self.name} layout",
                path=self.layout.source,
                hint=f"supported: {', '.join(sorted(self.layout.classes))}",
            )
        return self.layout.default_class

    def class_info(self, config: dict) -> dict[str, Any]:
        name = self.class_name(config)
        return self.layout.classes.get(name, {"output": "logits"}) if name else {"output": "logits"}

    def has_tied_head(self, config: dict) -> bool:
        """The model computes logits with the input embedding matrix (weights tied)."""
        tie = self.layout.tie
        if not tie or not self.class_info(config).get("tied_head", False):
            return False
        value = config_get(config, tie["config_key"])
        return bool(tie["default"] if value is None else value)

    def config_problem(self, config: dict) -> str | None:
        """Why the runtime would refuse this config, or None. Checked for the source's
        config (a bad input) and for the grown one (options that cannot work)."""
        names = config.get("architectures")
        if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
            return f"'architectures' must be a list of class names, got {names!r}"
        return None

    def derived_config_value(self, config: dict, key: str):
        """The value the runtime derives for a config key the file leaves out, or None."""
        return None

    def task(self, config: dict) -> str | None:
        """causal_lm, masked_lm, image_classification, encoder, ... (the layout's class)."""
        return self.class_info(config).get("task")

    def tied_parameters(self, config: dict) -> dict[str, str]:
        """Stored name of a tied tensor -> the tensor it shares storage with."""
        if not self.has_tied_head(config):
            return {}
        return {self.layout.tie["head"]: self.layout.tie["embedding"]}

    # -- the runtime contract (verify, fit, train, export) -----------------------------

    def build_module(self, config: dict) -> torch.nn.Module:
        raise NotImplementedError(f"architecture {self.name} has no module factory; verify/fit/train/export need one")

    def model_inputs(self, config: dict, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The inputs a loss step gives the module, picked from a training batch."""
        return {"input_ids": batch["input_ids"]}

    def call(self, module: torch.nn.Module, config: dict, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run ``module`` on ``inputs`` and return its primary output (logits, hidden states)."""
        return self.primary_output(config, module(**inputs))

    def prepare_for_training(self, module: torch.nn.Module, config: dict) -> torch.nn.Module:
        """The module as a training step runs it; as it is by default."""
        return module

    def prepare_for_export(self, module: torch.nn.Module, config: dict) -> torch.nn.Module:
        """The module as an exporter traces it (static shapes); as it is by default."""
        return module

    def module_tensors(self, module: torch.nn.Module, tensors: dict[str, torch.Tensor],
                       source: str | Path) -> dict[str, torch.Tensor]:
        """Tensors named as in the checkpoint, keyed by the module's names (any subset of
        the model: a streamed run loads one block at a time)."""
        expected = module.state_dict()
        mapped = {}
        for name, tensor in tensors.items():
            key = self.module_key(name, expected)
            if key is not None:
                mapped[key] = tensor
            elif not self.optional_in_module(name):
                raise InputError(f"tensor {name!r} has no place in a {type(module).__name__}", path=source)
        return mapped

    def load_weights(self, module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
        """Load tensors named as in the checkpoint; every module weight must be covered."""
        expected = module.state_dict()
        is_optional = self.optional_in_module
        mapped = self.module_tensors(module, tensors, source)
        tied = self._tied_keys(module, loaded=set(mapped))
        missing = [k for k in expected if k not in mapped and k not in tied and not is_optional(k)]
        if missing:
            raise InputError(f"{len(missing)} weights missing for {type(module).__name__}, e.g. {missing[0]!r}", path=source)
        module.load_state_dict(mapped, strict=False)

    def optional_in_module(self, key: str) -> bool:
        """True for a weight name the module may have or lack whatever the checkpoint holds.

        Nothing by default: a plugin's module factory builds exactly what its config says.
        """
        return False

    def example_inputs(self, config: dict, batch: int, seq: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random inputs of the kind the layout's ``inputs`` declares (tokens or images)."""
        inputs = self.layout.inputs
        if inputs.get("kind") == "image":
            # Images are sized by the config, not by ``seq``: the patch grid is fixed.
            size = config_get(config, inputs["image_size"])
            channels = config_get(config, inputs["channels"])
            height, width = (size, size) if isinstance(size, int) else tuple(size)
            pixels = torch.randn((batch, channels, height, width), generator=generator)
            return {"pixel_values": pixels}
        vocab = self.layout.dims(config).vocab
        ids = torch.randint(0, vocab, (batch, seq), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def primary_output(self, config: dict, outputs: Any) -> torch.Tensor:
        key = self.class_info(config)["output"]
        if isinstance(outputs, dict) or hasattr(outputs, key):
            return outputs[key] if isinstance(outputs, dict) else getattr(outputs, key)
        return outputs[0] if isinstance(outputs, (tuple, list)) else outputs

    def module_key(self, name: str, keys) -> str | None:
        """The module's key for checkpoint tensor ``name`` (with or without ``base_prefix``)."""
        prefix = self.layout.base_prefix
        for candidate in (name, prefix + name, name[len(prefix):] if prefix and name.startswith(prefix) else None):
            if candidate is not None and candidate in keys:
                return candidate
        return None

    def parameter_names(self, module: torch.nn.Module, names: list[str]) -> dict[str, str]:
        """Checkpoint name -> module parameter name; every module parameter must be covered."""
        params = dict(module.named_parameters())  # tied parameters appear once
        out = {}
        for name in names:
            key = self.module_key(name, params)
            if key is None:
                raise RuntimeError(f"tensor {name!r} has no place in a {type(module).__name__}")
            out[name] = key
        missing = sorted(set(params) - set(out.values()))
        if missing:
            raise RuntimeError(f"{len(missing)} weights of {type(module).__name__} are not produced, e.g. {missing[0]!r}")
        return out

    def parameter_views(self, module: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, tuple | None]]:
        """Checkpoint name (-> its stored shape) -> (module parameter name, index): where
        training finds each stored tensor. The index (None: the whole parameter) selects it
        within a parameter the module fuses from several (transformers' experts)."""
        return {name: (key, None) for name, key in self.parameter_names(module, list(shapes)).items()}

    def _tied_keys(self, module: torch.nn.Module, loaded: set[str]) -> set[str]:
        """Module keys that alias a loaded parameter (a tied head shares the embedding's)."""
        loaded = {id(p) for k, p in module.named_parameters(remove_duplicate=False) if k in loaded}
        return {k for k, p in module.named_parameters(remove_duplicate=False) if id(p) in loaded}


class PrimaryOutput(torch.nn.Module):
    """A module called the way its architecture calls it, with one tensor out.

    Positional inputs are matched to ``input_names`` (what an ONNX graph needs); keyword
    inputs pass as they are. ``torch.func.functional_call`` on this wrapper reaches the
    wrapped module's parameters as ``model.<name>``.
    """

    def __init__(self, arch: Architecture, config: dict, module: torch.nn.Module, input_names=()):
        super().__init__()
        self.model = module
        self.arch, self.config, self.input_names = arch, config, list(input_names)

    def forward(self, *inputs: torch.Tensor, **named: torch.Tensor) -> torch.Tensor:
        return self.arch.call(self.model, self.config, {**dict(zip(self.input_names, inputs)), **named})


def block_path(module: torch.nn.Module, keys: list[str]) -> str:
    """The path of the submodule holding one layer's parameters (``keys``, named from
    ``module``): the longest common prefix of their names that is a submodule."""
    parts = [k.split(".") for k in keys]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    while common:
        try:
            module.get_submodule(".".join(common))
            return ".".join(common)
        except AttributeError:
            common.pop()
    raise RuntimeError(f"no submodule holds the layer of {keys[0]!r}")


def block_module(module: torch.nn.Module, keys: list[str]) -> torch.nn.Module:
    """The submodule holding one layer's parameters (``block_path``)."""
    return module.get_submodule(block_path(module, keys))
