"""User-facing errors: the CLI prints these as one paragraph and exits 2 (no traceback unless --debug)."""
from __future__ import annotations


class TagiError(Exception):
    """Bad input or a refused action. The message names the file/key/line and what was expected."""

    exit_code = 2


class ConfigError(TagiError):
    """A config file or override is malformed, has an unknown key, a wrong type or a missing value."""


class DataError(TagiError):
    """A data file (task JSON, split list, text corpus) cannot be used as it is."""


class ArtifactMismatchError(TagiError):
    """An artifact on disk (cache shard, checkpoint, export) belongs to another configuration or is corrupt."""

