"""Exceptions raised for bad checkpoints, models and inputs. All are ValueErrors."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not match its config."""


class ModelNotFoundError(CheckpointError, FileNotFoundError):
    """A path that does not exist and is not a reachable hub id."""


class UnsupportedModelError(ValueError):
    """A model type or architecture energon_hf does not implement."""


class EngineDeadError(RuntimeError):
    """A worker process of the multi-process engine died; the engine cannot run any more steps."""
