"""Checkpoint I/O: validated, lazy safetensors reading and atomic, sharded writing."""

from modelgrow.checkpoint.reader import (
    PICKLE_SUFFIXES,
    TAGALONG_FILES,
    Checkpoint,
    open_checkpoint,
)
from modelgrow.checkpoint.safetensors_format import (
    SAFETENSORS_DTYPES,
    TensorInfo,
    read_header,
)
from modelgrow.checkpoint.sizes import format_size, parse_size
from modelgrow.checkpoint.writer import CheckpointWriter, OutputFile

__all__ = [
    "PICKLE_SUFFIXES",
    "SAFETENSORS_DTYPES",
    "TAGALONG_FILES",
    "Checkpoint",
    "CheckpointWriter",
    "OutputFile",
    "TensorInfo",
    "format_size",
    "open_checkpoint",
    "parse_size",
    "read_header",
]
