"""Typed results of the public API (modelgrow.api).

Each result is a read-only mapping over the JSON report its command writes (shape in
``schemas/``), with typed properties for what a pipeline usually reads next.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .report import report_json, write_report


@dataclass(frozen=True)
class Result(Mapping):
    """A command's report: ``result["plan"]``, ``result.to_json()``, ``result.write(path)``."""

    report: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.report[key]

    def __iter__(self):
        return iter(self.report)

    def __len__(self) -> int:
        return len(self.report)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.to_json())

    def to_json(self, indent: int | None = 2) -> str:
        return report_json(self.report, indent)

    def write(self, path: str | Path) -> None:
        """Write the report atomically (what ``--report FILE`` does)."""
        write_report(self.report, path)

    @property
    def output(self) -> Path | None:
        """What the command wrote (None for a dry run)."""
        out = self.report.get("output")
        return Path(out["path"]) if out else None


@dataclass(frozen=True)
class ConvertResult(Result):
    """``modelgrow.convert``: the plan, the promise, the verification, the files."""

    onnx: ExportResult | None = field(default=None)

    @property
    def exact(self) -> bool:
        """The growth is promised function-preserving (and was checked when ``verified``).

        A ``dtype`` cast that rounds (report ``dtype.rounds``) comes on top: outputs then
        agree to that dtype's precision, which is the tolerance verification used.
        """
        return bool(self.report["promise"]["exact"])

    @property
    def verified(self) -> bool | None:
        """True/False: verification ran and passed/failed; None: it did not run."""
        v = self.report.get("verify")
        return None if v is None or "skipped" in v else bool(v["passed"])

    @property
    def params(self) -> tuple[int, int]:
        """(source, target) parameter counts."""
        plan = self.report["plan"]
        return plan["source_params"], plan["target_params"]


@dataclass(frozen=True)
class TrainResult(Result):
    """``modelgrow.train``: curves, costs and the dense output checkpoint."""

    @property
    def val_loss(self) -> tuple[float | None, float | None]:
        """Validation loss before the first step and after the last."""
        v = self.report["val_loss"]
        return v["before"], v["after"]


@dataclass(frozen=True)
class ExportResult(Result):
    """``modelgrow.export``: the ONNX file(s) and the onnxruntime parity check."""

    @property
    def parity_passed(self) -> bool | None:
        p = self.report.get("parity") or {}
        return None if "skipped" in p else p.get("passed")
