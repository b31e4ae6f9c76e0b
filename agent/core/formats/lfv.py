"""Legacy Lookout for Vision model components: SageMaker Neo / DLR-compiled models.

LFV's edge packages (and DDA's before its ONNX runtime) hold, under ``<stage type>/`` (e.g. ``mochi/``),
the output of a SageMaker Neo compilation job: ``compiled.so``, ``compiled.params``, ``compiled.meta`` and
the ``libdlr.so`` that runs them, next to a ``manifest.json`` without ``runtime`` (DDA reads that as
"dlr"). This agent runs ONNX models only, so such a package is listed FAILED with a message that says
what it is and what to do, rather than being skipped (which clients would see as NOT_FOUND).
"""

from __future__ import annotations

from pathlib import Path

#: Files a Neo compilation job writes (DLR's model directory layout).
NEO_FILES = ("compiled.so", "compiled.params", "compiled.meta", "libdlr.so", "compiled_model.json")

MIGRATION = ("this agent runs ONNX models only and cannot run it. Re-export the model to ONNX and package it "
             "with \"runtime\": \"onnx\" (edge-agent model build --format dda, or DDA's ONNX packaging); see "
             "docs/model-package.md, \"Legacy Lookout for Vision models\"")


def neo_artifacts(stage_dir: Path) -> list[str]:
    """The Neo/DLR files present in a stage directory (empty when it is not a Neo model)."""
    try:
        return [name for name in NEO_FILES if (stage_dir / name).is_file()]
    except OSError:
        return []


def legacy_message(stage: str, found: list[str]) -> str:
    files = ", ".join(f"{stage}/{name}" for name in found)
    return f"a SageMaker Neo / DLR-compiled Lookout for Vision model ({files}): {MIGRATION}"
