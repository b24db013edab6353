"""A checkpoint bound to its architecture: every tensor found, named and shape-checked.

Binding happens before any growth, so a checkpoint that disagrees with its layout or
its config is refused up front with the offending tensor's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import plugins
from .architecture import Architecture
from .checkpoint import Checkpoint, open_checkpoint
from .config_check import check_config
from .errors import CheckpointError, InputError
from .layout import EXPERT, Dims, Layout, TensorSpec


@dataclass(frozen=True)
class BoundTensor:
    spec: TensorSpec
    layer: int | None
    name: str  # as stored in the checkpoint


class SourceModel:
    """A readable checkpoint plus its architecture, dims and resolved tensor names."""

    def __init__(self, checkpoint: Checkpoint, arch: Architecture):
        self.checkpoint = checkpoint
        self.arch = arch
        self.layout: Layout = arch.layout
        self.config = checkpoint.config
        check_config(self.config, checkpoint.config_path or checkpoint.path, arch)  # every value, before any module
        problem = arch.config_problem(self.config)
        if problem:
            raise CheckpointError(problem, path=checkpoint.config_path or checkpoint.path)
        self.dims: Dims = self.layout.dims(self.config, checkpoint.config_path)
        names = checkpoint.names()
        # Checked before binding, which loops over layers: a lying layer count must not
        # turn into a long loop.
        if self.dims.layers > len(names):
            raise CheckpointError(
                f"config says {self.dims.layers} layers but the checkpoint holds only {len(names)} tensors",
                path=checkpoint.config_path or checkpoint.path,
            )

        prefix = self.layout.base_prefix
        # Checkpoints of the bare base model (and the canonical GPT-2 file) omit the prefix.
        self.prefixed = bool(prefix) and any(n.startswith(prefix) for n in names)
        self.tied = arch.has_tied_head(self.config)
        self.tied_names = set(arch.tied_parameters(self.config))  # stored once, as what they share
        self.present: set[str] = set()  # spec names present in this checkpoint
        self._bound: dict[tuple[str, int | None], BoundTensor] = {}
        # One spec per expert: to growth, expert 3's down_proj is a tensor like any other.
        self.tensor_specs = [one for spec in self.layout.tensors for one in
                             ([spec.for_expert(e) for e in range(self.dims.experts or 0)] if EXPERT in spec.name else [spec])]
        self._bind(names)

    @property
    def path(self) -> Path:
        return Path(self.checkpoint.path)

    # -- naming ------------------------------------------------------------------------

    def stored_name(self, spec: TensorSpec, layer: int | None) -> str:
        """The name this checkpoint's naming scheme gives a spec at a layer."""
        name = spec.render(layer)
        prefix = self.layout.base_prefix
        if prefix and not self.prefixed and name.startswith(prefix):
            name = name[len(prefix):]
        return name

    def specs(self) -> list[TensorSpec]:
        """Specs to carry into a grown model (a tied head is stored once, as the embedding)."""
        head = self.layout.tie["head"] if self.layout.tie and self.tied else None
        return [s for s in self.tensor_specs if s.name in self.present and s.name != head]

    def get(self, spec: TensorSpec, layer: int | None, rows: slice | None = None) -> torch.Tensor:
        """The stored tensor for a spec at a layer; ``rows``: only that slice of its first dimension."""
        return self.checkpoint.get(self._bound[(spec.name, layer)].name, rows)

    def info(self, spec: TensorSpec, layer: int | None):
        """The stored tensor's TensorInfo (dtype, shape) for a spec at a layer."""
        return self.checkpoint.info(self._bound[(spec.name, layer)].name)

    def __enter__(self) -> SourceModel:
        return self

    def __exit__(self, *exc) -> None:
        self.checkpoint.close()

    def bound(self) -> list[BoundTensor]:
        return list(self._bound.values())

    def param_count(self) -> int:
        """Parameters as the model has them: a tied head counts once."""
        return sum(self.checkpoint.info(b.name).numel for b in self._bound.values() if not self.is_tied_head(b.spec))

    # -- binding -----------------------------------------------------------------------

    def _bind(self, names: list[str]) -> None:
        available = set(names)
        used: set[str] = set()
        file = self.checkpoint.path
        for spec in self.tensor_specs:
            layers = range(self.dims.layers) if spec.per_layer else [None]
            found = [self._find(spec, layer, available) for layer in layers]
            hits = [f for f in found if f is not None]
            if not hits:
                if spec.optional or self.is_tied_head(spec):
                    continue
                raise CheckpointError(
                    f"tensor {self.stored_name(spec, 0 if spec.per_layer else None)!r} is missing "
                    f"(required by the {self.layout.name} layout)",
                    path=file,
                )
            if len(hits) != len(found):
                layer = next(i for i, f in enumerate(found) if f is None)
                raise CheckpointError(
                    f"tensor {self.stored_name(spec, layer)!r} is missing although other layers have it",
                    path=file,
                )
            self.present.add(spec.name)
            for layer, name in zip(layers, found):
                self._check_shape(spec, name)
                self._bound[(spec.name, layer)] = BoundTensor(spec, layer, name)
                used.add(name)
        if not self.tied and self._class_has_head() and self.layout.tie["head"] not in self.present:
            raise CheckpointError(
                f"the output head {self.layout.tie['head']!r} is missing and "
                f"{self.layout.tie['config_key']} is false",
                path=file,
                hint=f"set \"{self.layout.tie['config_key']}\": true in config.json if the head is tied",
            )
        ignored = self.layout.ignore_patterns()
        prefix = self.layout.base_prefix
        for name in names:
            if name in used:
                continue
            bare = prefix + name if prefix and not self.prefixed else name
            if any(p.match(bare) or p.match(name) for p in ignored):
                continue
            raise CheckpointError(
                f"unexpected tensor {name!r}: not described by the {self.layout.name} layout "
                f"(or beyond {self.layout.config_keys['layers']}={self.dims.layers})",
                path=file,
            )

    def _find(self, spec: TensorSpec, layer: int | None, available: set[str]) -> str | None:
        name = self.stored_name(spec, layer)
        if name in available:
            return name
        for new, old in self.layout.aliases:
            if new in name and name.replace(new, old) in available:
                return name.replace(new, old)
        return None

    def _class_has_head(self) -> bool:
        return bool(self.layout.tie) and self.arch.class_info(self.config).get("tied_head", False)

    def is_tied_head(self, spec: TensorSpec) -> bool:
        return spec.name in self.tied_names

    def expected_shape(self, spec: TensorSpec, dims: Dims, actual: tuple[int, ...]) -> tuple[int, ...] | None:
        """The shape a spec must have under ``dims``; fixed roles keep ``actual``'s size."""
        if len(actual) != len(spec.axes):
            return None
        return tuple(size if want is None else want for size, want in zip(actual, dims.axis_sizes(spec)))

    def _check_shape(self, spec: TensorSpec, name: str) -> None:
        actual = tuple(self.checkpoint.info(name).shape)
        expected = self.expected_shape(spec, self.dims, actual)
        if expected != actual:
            want = list(expected) if expected else f"{len(spec.axes)} axes ({', '.join('|'.join(a) for a in spec.axes)})"
            raise CheckpointError(
                f"tensor {name!r} has shape {list(actual)} but the config implies {want}",
                path=self.checkpoint.path,
                hint="the checkpoint and its config.json disagree",
            )


def open_source(path: str | Path, config_path: str | Path | None = None) -> SourceModel:
    checkpoint = open_checkpoint(path, config_path)
    try:
        arch = plugins.claim(checkpoint.config, checkpoint.names(), path=checkpoint.config_path or path)
        return SourceModel(checkpoint, arch)
    except BaseException:
        checkpoint.close()
        raise


def load_module(source: SourceModel) -> torch.nn.Module:
    """Build the architecture's module for this checkpoint and load its weights (fp32)."""
    try:
        module = source.arch.build_module(source.config)
    except InputError as err:  # a config transformers refuses: name the file
        raise err.located(source.checkpoint.config_path or source.path) from None
    tensors = {
        source.stored_name(b.spec, b.layer): source.checkpoint.get(b.name).float()
        for b in source.bound()
        if not source.is_tied_head(b.spec)
    }
    source.arch.load_weights(module, tensors, source.path)
    return module
