"""Sources named by a Hugging Face Hub id (``org/name``, ``org/name@revision``).

An argument that is not an existing local path and reads as a Hub repository id is
resolved through ``huggingface_hub.snapshot_download`` into its local cache and read
from there like any folder: only the weights (safetensors), JSON, tokenizer and card
files are fetched, never a pickle. With ``HF_HUB_OFFLINE`` set nothing is fetched
(``local_files_only``), and an id that is not cached is one line, exit 3. The cache is
the one huggingface_hub uses: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, read when the
source is resolved (so a process may change them after importing modelgrow).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .errors import InputError
from .version import __version__

# org/name: letters, digits, "-", "_", "." (huggingface_hub checks the finer rules);
# @revision: a branch, tag, commit or refs/pr/N.
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")
_FILE_SUFFIXES = (".safetensors", ".json", ".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What a model folder needs here; pickles (.bin, .pt), ONNX and other formats stay on the Hub.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "README.md", "LICENSE*", "LICENCE*", "NOTICE*",
                  "COPYING*", "USE_POLICY.md"]
_TRUE = {"1", "on", "yes", "true"}


def parse_hub_id(source: str | Path) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when ``source`` reads as a Hub id and is no local path."""
    text = str(source)
    if os.path.lexists(text) or text.lower().endswith(_FILE_SUFFIXES):
        return None
    match = _HUB_ID.fullmatch(text)
    if match is None or ".." in match["repo"] or "--" in match["repo"]:
        return None
    return match["repo"], match["revision"]


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def cache_dir() -> Path | None:
    """The cache huggingface_hub reads, by the environment now (None: its own default)."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HUGGINGFACE_HUB_CACHE"):  # the older spelling
        return Path(env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return None


def resolve(source: str | Path) -> tuple[str | Path, dict[str, Any] | None]:
    """(what to open, the Hub record) for a source argument; a local path is returned as is.

    The record (``{"id", "revision", "commit"}``) goes into the report and the model card.
    """
    parsed = parse_hub_id(source)
    if parsed is None:
        return source, None
    repo, revision = parsed
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # a dependency, but an environment can lack it
        raise InputError("is not a local path, and reading it as a Hugging Face Hub id needs huggingface_hub",
                         path=source, hint="pip install huggingface_hub") from None
    cache, local_only = cache_dir(), offline()
    try:
        folder = snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=local_only,
                                   allow_patterns=ALLOW_PATTERNS, library_name="modelgrow", library_version=__version__)
    except Exception as err:  # noqa: BLE001 - every failure here is about the input: one line, exit 3
        raise _hub_error(source, repo, revision, err, local_only, cache) from None
    return Path(folder), {"id": repo, "revision": revision, "commit": Path(folder).name}


def _hub_error(source, repo: str, revision: str | None, err: Exception, local_only: bool, cache: Path | None) -> InputError:
    kind = type(err).__name__
    at = f" at revision {revision}" if revision else ""
    where = cache if cache is not None else "the default Hugging Face cache"
    if local_only and kind in ("LocalEntryNotFoundError", "IncompleteSnapshotError", "FileNotFoundError"):
        return InputError(f"is not a local path, and the Hugging Face Hub repository {repo}{at} is not in the cache "
                          f"({where}) while HF_HUB_OFFLINE is set", path=source,
                          hint="download it once with network access, or unset HF_HUB_OFFLINE")
    if kind in ("RepositoryNotFoundError", "GatedRepoError"):
        return InputError(f"is not a local path, and the Hugging Face Hub has no repository {repo} that this "
                          "machine may read", path=source, hint="check the id, or log in with `hf auth login`")
    if kind == "RevisionNotFoundError":
        return InputError(f"the Hugging Face Hub repository {repo} has no revision {revision}", path=source)
    first = (str(err).strip().splitlines() or [""])[0]
    return InputError(f"is not a local path, and fetching it from the Hugging Face Hub{at} failed: {kind}: {first}",
                      path=source, hint="check the network, or set HF_HUB_OFFLINE=1 to use the cache only")
