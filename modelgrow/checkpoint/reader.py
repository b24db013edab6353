"""Open a safetensors checkpoint (file, sharded index or Hugging Face folder) lazily.

Every shard's header is validated when the checkpoint is opened, so a bad file is
reported before any growth work starts, and every file read is pinned (its identity
recorded, checked again by ``verify_unchanged``; see checkpoint/pinned.py). Tensor data
is read one tensor at a time with ordinary reads, never memory-mapped. Pickled
checkpoints are refused, never loaded: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import torch

from modelgrow.checkpoint import tagalong
from modelgrow.checkpoint.pinned import FileIdentity, ShardFile, check_unchanged, identity
from modelgrow.checkpoint.safetensors_format import TensorInfo, read_header, shorten
from modelgrow.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

#: Files a Hugging Face model folder carries beside its weights; copied to the output
#: (with more: sentence-transformers packaging, templates and licences; checkpoint/tagalong.py).
TAGALONG_FILES = tagalong.FILES

_CONVERT_HINT = (
    "convert it in an environment you trust: load it there and save it with "
    "model.save_pretrained(out_dir, safe_serialization=True), or "
    "safetensors.torch.save_file(state_dict, 'model.safetensors')"
)


def safe_open(path: str, framework: str = "pt", device: str = "cpu") -> ShardFile:
    """Open one shard to read tensors from, with ordinary reads (no memory map).

    Named after the safetensors function it replaced, with the same arguments; unlike
    it, a file truncated while it is read gives a one-line CheckpointError, not SIGBUS.
    """
    if framework != "pt" or device != "cpu":
        raise ValueError("only framework='pt' on device='cpu' is supported")
    return ShardFile(Path(path))


def _pickled_error(path: Path) -> CheckpointError:
    return CheckpointError(
        "is a pickled PyTorch checkpoint; modelgrow never unpickles files, because "
        "loading a pickle can run arbitrary code",
        path=path,
        hint=_CONVERT_HINT,
    )


class Checkpoint:
    """Tensors of one checkpoint, read lazily; use as a context manager or call close()."""

    def __init__(
        self,
        *,
        path: Path,
        root: Path,
        config: dict,
        config_path: Path,
        files: list[Path],
        tensors: dict[str, TensorInfo],
        metadata: dict[str, str],
        in_model_folder: bool,
        tagalong_found: tagalong.Found | None = None,
        data_starts: dict[Path, int],
        pins: dict[Path, FileIdentity | None],
    ):
        self.path = path
        self.root = root
        self.config = config
        self.config_path = config_path
        self.files = files
        self.metadata = metadata
        self._tensors = tensors
        self._in_model_folder = in_model_folder
        self._tagalong = tagalong_found or tagalong.Found(root)
        self._data_starts = data_starts
        self._pins = pins
        self._handles: dict[Path, ShardFile] = {}

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in {self.path}") from None

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Read one tensor (``rows``: only that slice of its first dimension) from its shard,
        where the header validated at open time says it is.

        The shard stays open. A file that ends early (truncated or replaced since it was
        opened) raises "the source changed while it was read".
        """
        info = self.info(name)
        try:
            handle = self._handles.get(info.file)
            if handle is None:
                handle = safe_open(str(info.file), framework="pt", device="cpu")
                self._handles[info.file] = handle
        except OSError as err:
            raise CheckpointError(
                f"cannot read tensor {name!r}: {err.strerror or err}", path=info.file
            ) from err
        try:
            return handle.read(self._data_starts[info.file], info, rows)
        except OSError as err:
            raise CheckpointError(
                f"cannot read tensor {name!r}: {err.strerror or err}", path=info.file
            ) from err

    def verify_unchanged(self) -> None:
        """Raise CheckpointError (exit 3) if any file read for this checkpoint changed since it was opened.

        Compares each file's identity (device, inode, size, mtime, ctime) recorded at
        open time with the file at its path now and with the file each open shard reads.
        Call it after the last read, before committing anything derived from it.
        """
        check_unchanged(self._pins, self._handles)

    def skipped_tagalong(self) -> dict[str, str]:
        """Tag-along files left behind, with the reason (a link out of the folder, a FIFO, ...)."""
        return dict(self._tagalong.left_behind)

    def tagalong_files(self) -> list[Path]:
        """Tokenizer and similar files to copy beside the grown weights (those there when opened)."""
        return list(self._tagalong.files.values())

    def tagalong_found(self) -> tagalong.Found:
        """What travels with the weights, as found when opened (tagalong.write copies it)."""
        return self._tagalong

    def card_file(self) -> tuple[Path | None, str | None]:
        """The source's model card (README.md) if it could be copied as a tag-along file is:
        (path, None), (None, why it cannot), or (None, None) when there is none. Never copied
        unless asked (``--keep-card``): an output gets a card of its own."""
        if not self._in_model_folder:
            return None, None
        real, why = tagalong.vet(self.root, CARD_FILE)
        return (self.root / CARD_FILE if real is not None else None), why

    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self._tensors.values())

    def close(self) -> None:
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        count = len(self._tensors)
        return f"Checkpoint({str(self.path)!r}, {count} tensors, {len(self.files)} files)"


def open_checkpoint(path: str | Path, config_path: str | Path | None = None) -> Checkpoint:
    """Open a .safetensors file, a model.safetensors.index.json, or a model folder.

    The config is ``config_path`` if given, else config.json in the checkpoint's folder.
    """
    given = Path(path)
    try:
        return _open_checkpoint(given, config_path)
    except OSError as err:
        # pathlib's exists()/is_dir()/is_file() raise instead of answering False for a
        # name that is too long (a hostile shard name in an index), a permission denied
        # or a symlink loop: bad input to report, not a modelgrow bug.
        name = f" {shorten(str(err.filename))}" if err.filename else ""
        raise CheckpointError(f"cannot read{name}: {err.strerror or err}", path=given) from None


def _open_checkpoint(given: Path, config_path: str | Path | None) -> Checkpoint:
    if not given.exists():
        raise CheckpointError("does not exist", path=given)
    weights = _find_weights(given)
    root = given if given.is_dir() else given.parent

    # Each identity is taken before the file is read, so a change while it is read shows.
    pins: dict[Path, FileIdentity | None] = {}
    if weights.name.endswith(".index.json"):
        pins[weights] = identity(weights)
        files, expected = _read_index(weights, root)
    else:
        files, expected = [weights], None
    pins.update((file, identity(file)) for file in files)
    tensors, metadata, data_starts = _read_headers(files, expected, weights)

    default_config = root / CONFIG_FILE
    config_file = Path(config_path) if config_path is not None else default_config
    pins[config_file] = identity(config_file)
    config = _read_config(config_file, given)
    # Tag-along files only make sense when the weights sit in a model folder with their
    # config; a loose file paired with a config from elsewhere has no tokenizer of its own.
    in_model_folder = given.is_dir() or config_file.resolve() == default_config.resolve()
    found = tagalong.survey(root) if in_model_folder else None
    pins.update(found.pins if found else {})
    return Checkpoint(
        path=given,
        root=root,
        config=config,
        config_path=config_file,
        files=files,
        tensors=tensors,
        metadata=metadata,
        in_model_folder=in_model_folder,
        tagalong_found=found,
        data_starts=data_starts,
        pins=pins,
    )


def _find_weights(given: Path) -> Path:
    """The safetensors file or index to read, or a CheckpointError saying why there is none."""
    if given.is_dir():
        for name in (SINGLE_FILE, INDEX_FILE):  # same preference as transformers
            if (given / name).is_file():
                return given / name
        pickled = sorted(
            p.name
            for p in given.iterdir()
            if p.suffix in PICKLE_SUFFIXES or p.name.endswith(".bin.index.json")
        )
        if pickled:
            raise CheckpointError(
                f"folder holds only pickled weights ({', '.join(pickled)}); modelgrow never "
                "unpickles files, because loading a pickle can run arbitrary code",
                path=given,
                hint=_CONVERT_HINT,
            )
        raise CheckpointError(
            f"folder has no {SINGLE_FILE} or {INDEX_FILE}",
            path=given,
            hint="pass a Hugging Face model folder, a .safetensors file or an index file",
        )
    if given.suffix in PICKLE_SUFFIXES or given.name.endswith(".bin.index.json"):
        raise _pickled_error(given)
    if given.suffix == ".safetensors" or given.name.endswith(".safetensors.index.json"):
        return given
    raise CheckpointError(
        "is not a .safetensors file, a .safetensors.index.json index or a model folder",
        path=given,
    )


def _load_json_object(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise CheckpointError(f"cannot read {what}: {err.strerror or err}", path=path) from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{what} is not valid UTF-8", path=path) from None
    except RecursionError:
        raise CheckpointError(f"{what} JSON is nested too deeply", path=path) from None
    except ValueError as err:
        raise CheckpointError(f"{what} is not valid JSON: {str(err)[:80]}", path=path) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} must be a JSON object, got {type(data).__name__}", path=path)
    return data


def _read_config(config_file: Path, given: Path) -> dict:
    if not config_file.is_file():
        raise CheckpointError(
            f"no config found at {config_file}",
            path=given,
            hint="put the model's config.json beside the weights or pass --config PATH",
        )
    return _load_json_object(config_file, "config")


def _read_index(index: Path, root: Path) -> tuple[list[Path], dict[str, Path]]:
    """Shard files (in first-mention order) and the shard each tensor is listed in."""
    data = _load_json_object(index, "index")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError("index has no weight_map object listing tensors", path=index)
    shards: dict[str, Path] = {}
    expected: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"index maps {name!r} to {shard!r}, not a file name", path=index)
        if shard not in shards:
            shards[shard] = _shard_path(shard, root, index)
        expected[name] = shards[shard]
    return list(shards.values()), expected


def _shard_path(shard: str, root: Path, index: Path) -> Path:
    # Checked lexically, not with resolve(): the Hugging Face cache symlinks shards to
    # blobs outside the snapshot folder, and that is fine. Escaping via the name is not.
    pure = PurePosixPath(shard)
    if pure.is_absolute() or "\\" in shard or ".." in pure.parts:
        raise CheckpointError(
            f"index names shard {shard!r} outside the checkpoint folder", path=index
        )
    if not shard.endswith(".safetensors"):
        # Else an index pointing at config.json gets config.json blamed for not being
        # a safetensors file, and the index, the file actually wrong, goes unnamed.
        raise CheckpointError(
            f"index names shard {shorten(repr(shard))}, which is not a .safetensors file", path=index
        )
    path = root / pure
    if not path.is_file():
        raise CheckpointError(f"index names shard {shard!r}, which does not exist", path=index)
    return path


def _read_headers(
    files: list[Path], expected: dict[str, Path] | None, source: Path
) -> tuple[dict[str, TensorInfo], dict[str, str], dict[Path, int]]:
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    data_starts: dict[Path, int] = {}
    for i, file in enumerate(files):
        header, file_metadata, data_starts[file] = read_header(file)
        if i == 0:
            metadata = file_metadata
        for name, info in header.items():
            if name in tensors:
                raise CheckpointError(
                    f"tensor {name!r} is stored in two shards: {tensors[name].file.name} "
                    f"and {file.name}",
                    path=source,
                )
            tensors[name] = info
    for name, shard in (expected or {}).items():
        if name not in tensors or tensors[name].file != shard:
            raise CheckpointError(
                f"index lists tensor {name!r} in {shard.name}, but that shard does not hold it",
                path=source,
            )
    return tensors, metadata, data_starts
