"""Moved to agent/core/running_set.py (standalone mode persists its RUNNING set too); kept for importers."""

from agent.core.running_set import STATE_FILE, RunningModels

__all__ = ["STATE_FILE", "RunningModels"]
