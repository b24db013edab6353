"""Architectures: a layout (what the tensors are) plus how to run the model (a module
factory, example inputs, the primary output). Growth needs only the layout; verify, fit
and export also need the module factory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import InputError, LayoutError, UsageError
from .layout import Layout


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
        return bool(config.get(tie["config_key"], tie["default"]))

    def validate_config(self, config: dict) -> None:
        """Raise UsageError if the runtime would refuse this (grown) config."""

    # -- running the model (verify, fit, export) --------------------------------------

    def build_module(self, config: dict) -> torch.nn.Module:
        raise NotImplementedError(f"architecture {self.name} has no module factory; verify/fit/export need one")

    def load_weights(self, module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
        """Load tensors named as in the checkpoint; every module weight must be covered."""
        expected = module.state_dict()
        prefix = self.layout.base_prefix
        mapped = {}
        for name, tensor in tensors.items():
            for candidate in (name, prefix + name, name[len(prefix):] if prefix and name.startswith(prefix) else None):
                if candidate is not None and candidate in expected:
                    mapped[candidate] = tensor
                    break
            else:
                raise InputError(f"tensor {name!r} has no place in a {type(module).__name__}", path=source)
        missing = [k for k in expected if k not in mapped and not _is_tied(module, k)]
        if missing:
            raise InputError(f"{len(missing)} weights missing for {type(module).__name__}, e.g. {missing[0]!r}", path=source)
        module.load_state_dict(mapped, strict=False)

    def example_inputs(self, config: dict, batch: int, seq: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
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


class HFArchitecture(Architecture):
    """An architecture run by Hugging Face transformers (the reference implementation)."""

    def hf_config(self, config: dict):
        import transformers

        cfg = dict(config)
        model_type = cfg.pop("model_type", None) or self.layout.model_types[0]
        return transformers.AutoConfig.for_model(model_type, **cfg)

    def validate_config(self, config: dict) -> None:
        try:
            self.hf_config(config)
        except Exception as exc:  # noqa: BLE001 - transformers' validators raise many types
            raise UsageError(f"transformers refuses the target config: {exc}", hint="change --heads/--kv-heads/--width") from None

    def build_module(self, config: dict) -> torch.nn.Module:
        import transformers

        hf_config = self.hf_config(config)
        hf_config._attn_implementation = "eager"  # the plainest path: the reference maths
        cls = getattr(transformers, self.class_name(config))
        with torch.device("cpu"):
            module = cls(hf_config)
        return module.float().eval()

    def example_inputs(self, config, batch, seq, generator):
        inputs = super().example_inputs(config, batch, seq, generator)
        types = config.get("type_vocab_size")
        if types:
            inputs["token_type_ids"] = torch.randint(0, types, (batch, seq), generator=generator)
        return inputs
