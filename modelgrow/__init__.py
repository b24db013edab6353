"""modelgrow: grow small pretrained transformer checkpoints into larger ones.

The public API (modelgrow.api) is importable from here: ``modelgrow.convert``,
``modelgrow.verify``, ``modelgrow.train``, ``modelgrow.export``, ``modelgrow.inspect``.
It loads on first use, so ``import modelgrow`` stays cheap.
"""

from .version import __version__

API = ("convert", "verify", "train", "export", "inspect")


def __getattr__(name: str):
    if name in API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'modelgrow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])
