"""Checkpoint I/O: validated, lazy safetensors reading and atomic, sharded writing."""

from modelgrow.checkpoint.atomic import MARKER_NAME, publish_file_set
from modelgrow.checkpoint.marker import check_replaceable
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
    "MARKER_NAME",
    "PICKLE_SUFFIXES",
    "SAFETENSORS_DTYPES",
    "TAGALONG_FILES",
    "Checkpoint",
    "CheckpointWriter",
    "OutputFile",
    "TensorInfo",
    "check_replaceable",
    "format_size",
    "open_checkpoint",
    "parse_size",
    "publish_file_set",
    "read_header",
]
