"""Architectures run by Hugging Face transformers (the reference implementation).

Everything transformers-specific sits here: config objects, module classes, the
``return_dict``/``use_cache`` calling convention, the KV cache switched off for
training, and transformers 5's in-memory renaming of some modules.
"""

from __future__ import annotations

import inspect
import re
from functools import cached_property

import torch

from ..architecture import Architecture
from ..config_check import build_error, first_line, rope_problem
from ..errors import UsageError
from ..layout import template_regex


def _resolve(module: torch.nn.Module, names) -> dict[str, tuple[str, object, str | None]]:
    """Checkpoint name -> (module key, the expert-stacking converter that merges it or None,
    that converter's source pattern), by transformers' conversion mapping.

    One-to-one renamings give the new key; the many-to-one merges transformers 5 uses for
    mixture-of-experts blocks (per-expert tensors stacked into one fused parameter, gate
    and up projections concatenated) give the fused key and the converter; names the
    module already uses, any other many-to-one conversion (left for load_weights to
    refuse) and transformers versions without conversion mappings keep the name.
    """
    plain = {name: (name, None, None) for name in names}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return plain
    expected = module.state_dict()
    if all(name in expected for name in names):
        return plain
    transforms = get_model_conversion_mapping(module)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    for name in names:
        if name in expected:
            continue
        renamed, pattern = rename_source_key(name, renamings, converters, module.base_model_prefix, expected)
        converter = next((c for c in converters if pattern in c.source_patterns), None) if pattern else None
        if pattern is None:
            plain[name] = (renamed, None, None)
        elif _stacks_experts(converter):
            plain[name] = (renamed, converter, pattern)
    return plain


def _merged(places: dict, names) -> dict[str, tuple[object, dict[str, dict[int, str]]]]:
    """Fused key -> (its converter, {source pattern: {expert: checkpoint name}})."""
    merges: dict[str, tuple[object, dict[str, dict[int, str]]]] = {}
    for name in names:
        key, converter, pattern = places[name]
        if converter is not None:
            merges.setdefault(key, (converter, {}))[1].setdefault(pattern, {})[_expert_index(name, pattern)] = name
    return merges


def _hf_module_names(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint names -> the module's parameter names (``_resolve``): renamed tensors
    pass as they are, per-expert ones are stacked (and concatenated) into the fused
    parameter they make."""
    places = _resolve(module, tensors)
    out = {places[name][0]: tensor for name, tensor in tensors.items() if places[name][1] is None}
    for target, (converter, parts) in _merged(places, tensors).items():
        merge, *concat = converter.operations
        stacked = [torch.stack([tensors[experts[e]] for e in sorted(experts)], dim=merge.dim)
                   for experts in (parts.get(p, {}) for p in converter.source_patterns) if experts]
        out[target] = torch.cat(stacked, dim=concat[0].dim) if concat else stacked[0]
    return out


def _hf_views(module: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, tuple | None]]:
    """Checkpoint name -> (module key, index): where each stored tensor lives in the module.
    The index (None: the whole parameter) picks a per-expert tensor out of a fused one:
    the expert along the stacked dim, its slice along the concatenated dim (gate, then up)."""
    places = _resolve(module, shapes)
    views: dict[str, tuple[str, tuple | None]] = {n: (key, None) for n, (key, conv, _) in places.items() if conv is None}
    for target, (converter, parts) in _merged(places, shapes).items():
        merge, *concat = converter.operations
        offset = 0
        for pattern in converter.source_patterns:
            size = 0
            for expert, name in parts.get(pattern, {}).items():
                shape = shapes[name]
                index: list = [slice(None)] * (len(shape) + 1)
                index[merge.dim] = expert
                if concat:  # the dim in stacked coordinates, and the same dim of one expert's tensor
                    dim = concat[0].dim
                    size = shape[dim - 1 if dim > merge.dim else dim]
                    index[dim] = slice(offset, offset + size)
                views[name] = (target, tuple(index))
            offset += size
    return views


def _stacks_experts(converter) -> bool:
    """A conversion that stacks a module list (then maybe concatenates): MoE experts."""
    kinds = [type(op).__name__ for op in getattr(converter, "operations", None) or []]
    return kinds in (["MergeModulelist"], ["MergeModulelist", "Concatenate"]) and len(converter.target_patterns) == 1


def _expert_index(name: str, pattern: str) -> int:
    match = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), name)
    return int(match.group(1))


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
            hf_config = self.hf_config(config)
        except Exception as exc:  # noqa: BLE001 - transformers' validators raise many types
            return f"transformers refuses the config: {first_line(exc)}"
        return rope_problem(hf_config)  # what transformers checks only when it builds the module

    def derived_config_value(self, config: dict, key: str):
        # transformers fills some keys in from others (Gemma 3's layer_types from its
        # sliding-window pattern); depth growth must write them out, or they would be
        # derived again for the new depth.
        try:
            value = getattr(self.hf_config(config), key, None)
        except Exception:  # noqa: BLE001 - config_problem reports a config transformers refuses
            return None
        return list(value) if isinstance(value, (list, tuple)) else value

    def build_module(self, config: dict) -> torch.nn.Module:
        import transformers

        hf_config = self.hf_config(config)
        hf_config._attn_implementation = "eager"  # the plainest path: the reference maths
        if hasattr(hf_config, "_experts_implementation"):
            hf_config._experts_implementation = "eager"  # a loop over experts: exportable, no grouped kernels
        cls = getattr(transformers, self.class_name(config))
        with torch.device("cpu"):
            try:
                module = cls(hf_config)
            except Exception as exc:  # noqa: BLE001 - a value transformers or torch refuses: bad input, one line
                raise build_error(cls.__name__, exc) from None
        return module.float().eval()

    def optional_in_module(self, key: str) -> bool:
        # Optional tensors exist or not by how a model was built (ViTModel's pooler and
        # mask token are constructor flags no config records): the module may have one the
        # checkpoint lacks, or lack one the checkpoint has. Neither feeds the primary output.
        prefix = self.layout.base_prefix
        return any(p.match(c) for p in self._optional_patterns for c in (key, prefix + key))

    @cached_property
    def _optional_patterns(self) -> list:
        return [template_regex(t.name) for t in self.layout.tensors if t.optional]

    def parameter_names(self, module, names):
        # A learned operator's fit addresses parameters one stored tensor at a time; experts
        # that transformers fuses into one parameter have no such place (yet). Training
        # reaches them through parameter_views.
        places = _resolve(module, names)
        if any(converter is not None for _, converter, _ in places.values()):
            raise UsageError(f"fitting a learned operator on a {type(module).__name__} is not supported yet: "
                             "transformers fuses its experts into one parameter", hint="grow with the copy operator")
        renamed = {key: name for name, (key, _, _) in places.items()}
        return {renamed[k]: v for k, v in super().parameter_names(module, list(renamed)).items()}

    def parameter_views(self, module, shapes):
        views = _hf_views(module, shapes)
        keys = super().parameter_names(module, sorted({key for key, _ in views.values()}))
        return {name: (keys[key], index) for name, (key, index) in views.items()}

    def module_tensors(self, module, tensors, source):
        # transformers 5 renames some modules in memory but still saves (and hub files
        # hold) the original names, e.g. ViT's "encoder.layer.0.attention.attention.query"
        # is "layers.0.attention.q_proj" in the module: translate with its own mapping
        # (load_weights goes through here too).
        return super().module_tensors(module, _hf_module_names(module, tensors), source)

    def example_inputs(self, config, batch, seq, generator):
        inputs = super().example_inputs(config, batch, seq, generator)
        types = config.get("type_vocab_size")
        if types and "input_ids" in inputs:
            inputs["token_type_ids"] = torch.randint(0, types, (batch, seq), generator=generator)
        return inputs

    def call(self, module, config, inputs):
        return self.primary_output(config, module(**inputs, **_call_options(module)))

    def prepare_for_export(self, module, config):
        cfg = getattr(module, "config", None)
        if getattr(cfg, "_experts_implementation", None) is not None:
            # The eager expert loop has data-dependent shapes torch.export cannot trace; the
            # batched form gathers each token's expert weights: static shapes, same maths.
            cfg._experts_implementation = "batched_mm"
        return module

    def prepare_for_training(self, module, config):
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "use_cache"):
            cfg.use_cache = False  # a KV cache is dead weight in a training step
        return module


def _call_options(module: torch.nn.Module) -> dict:
    """Outputs as a dict, and no KV cache (it would become extra graph outputs)."""
    params = inspect.signature(module.forward).parameters
    options = {"return_dict": True}
    if "use_cache" in params:
        options["use_cache"] = False
    return options
