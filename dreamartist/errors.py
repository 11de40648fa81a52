"""User-facing errors: each carries one plain sentence that the CLI, the tab and the API show as is."""
from __future__ import annotations


class DreamArtistError(Exception):
    """Base class: a problem the user can fix; its message is shown without a traceback."""


class InputError(DreamArtistError):
    """Bad user input: an image, a name, a file, an option value."""


class ModelError(DreamArtistError):
    """The model cannot be used: missing, unreadable, or an unsupported family."""


class TrainingStopped(DreamArtistError):
    """Training ended early for a reason the user must know (non-finite loss, out of memory)."""


class PairBusy(DreamArtistError):
    """Another run holds the pair's name in that folder (the API answers 409)."""


class NameTaken(InputError):
    """The pair's name is already used by an embedding the webui would load (the API answers 409)."""
