"""Architectures: a layout (what the tensors are) plus how to run the model (a module
factory, example inputs, the primary output). Growth needs only the layout; verify, fit
and export also need the module factory.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, LayoutError
from .layout import Layout, _template_regex, config_get


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

    # -- running the model (verify, fit, export) --------------------------------------

    def build_module(self, config: dict) -> torch.nn.Module:
        raise NotImplementedError(f"architecture {self.name} has no module factory; verify/fit/export need one")

    def load_weights(self, module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
        """Load tensors named as in the checkpoint; every module weight must be covered."""
        expected = module.state_dict()
        prefix = self.layout.base_prefix
        is_optional = self.optional_in_module
        mapped = {}
        for name, tensor in tensors.items():
            for candidate in (name, prefix + name, name[len(prefix):] if prefix and name.startswith(prefix) else None):
                if candidate is not None and candidate in expected:
                    mapped[candidate] = tensor
                    break
            else:
                if is_optional(name):
                    continue
                raise InputError(f"tensor {name!r} has no place in a {type(module).__name__}", path=source)
        missing = [k for k in expected if k not in mapped and not _is_tied(module, k) and not is_optional(k)]
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


def _is_tied(module: torch.nn.Module, key: str) -> bool:
    tied = getattr(module, "_tied_weights_keys", None) or {}
    return key in tied


def _hf_module_names(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint names -> the module's parameter names, by transformers' conversion mapping.

    Only one-to-one renamings are applied; names the module already uses pass through.
    transformers versions without conversion mappings need none.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return tensors
    expected = module.state_dict()
    if all(name in expected for name in tensors):
        return tensors
    transforms = get_model_conversion_mapping(module)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    out = {}
    for name, tensor in tensors.items():
        new = name
        if name not in expected:
            renamed, converter = rename_source_key(name, renamings, converters, module.base_model_prefix, expected)
            if converter is None:  # a many-to-one conversion is left for load_weights to refuse
                new = renamed
        out[new] = tensor
    return out


class HFArchitecture(Architecture):
    """An architecture run by Hugging Face transformers (the reference implementation)."""

    def hf_config(self, config: dict):
        import transformers

        cfg = dict(config)
        model_type = cfg.pop("model_type", None) or self.layout.model_types[0]
        return transformers.AutoConfig.for_model(model_type, **cfg)

    def config_problem(self, config: dict) -> str | None:
        problem = super().config_problem(config)
        if problem:
            return problem
        from transformers import CONFIG_MAPPING

        model_type = config.get("model_type") or self.layout.model_types[0]
        if model_type not in CONFIG_MAPPING:
            # A model type transformers does not know: growth needs only the layout;
            # building the module (verify, fit, export) will say what is missing.
            return None
        try:
            self.hf_config(config)
        except Exception as exc:  # noqa: BLE001 - transformers' validators raise many types
            return f"transformers refuses the config: {exc}"
        return None

    def build_module(self, config: dict) -> torch.nn.Module:
        import transformers

        hf_config = self.hf_config(config)
        hf_config._attn_implementation = "eager"  # the plainest path: the reference maths
        cls = getattr(transformers, self.class_name(config))
        with torch.device("cpu"):
            module = cls(hf_config)
        return module.float().eval()

    def optional_in_module(self, key: str) -> bool:
        # Optional tensors exist or not by how a model was built (ViTModel's pooler and
        # mask token are constructor flags no config records): the module may have one the
        # checkpoint lacks, or lack one the checkpoint has. Neither feeds the primary output.
        prefix = self.layout.base_prefix
        return any(p.match(c) for p in self._optional_patterns for c in (key, prefix + key))

    @cached_property
    def _optional_patterns(self) -> list:
        return [_template_regex(t.name) for t in self.layout.tensors if t.optional]

    def load_weights(self, module, tensors, source):
        # transformers 5 renames some modules in memory but still saves (and hub files
        # hold) the original names, e.g. ViT's "encoder.layer.0.attention.attention.query"
        # is "layers.0.attention.q_proj" in the module: translate with its own mapping.
        return super().load_weights(module, _hf_module_names(module, tensors), source)

    def example_inputs(self, config, batch, seq, generator):
        inputs = super().example_inputs(config, batch, seq, generator)
        types = config.get("type_vocab_size")
        if types and "input_ids" in inputs:
            inputs["token_type_ids"] = torch.randint(0, types, (batch, seq), generator=generator)
        return inputs
