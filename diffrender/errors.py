"""The one exception type for bad user input, kept apart from the Hydra schemas so that readers of
files (io, checkpoints, scenes) and the camera can raise it without importing config registration."""

from __future__ import annotations


class UserError(ValueError):
    """Bad user input (unknown scene, missing file, unreadable image, degenerate camera, ...): the CLI
    prints its one-line message as ``error: ...`` and exits with code 2, without a traceback."""
