"""Error types. Every error the pack raises for bad input is a ``ValueError`` whose
message says what was given, what was expected and what to do about it."""

from __future__ import annotations


class VP2PError(ValueError):
    """Base class of every user-facing error of the pack."""


class UnsupportedModelError(VP2PError):
    """The model has no SD-style spatial transformer blocks to patch."""


class LayoutError(VP2PError):
    """A batch does not split into the rows the layout describes."""


class SettingsError(VP2PError):
    """A node or function received an option it cannot honour."""


class RegistrationError(VP2PError):
    """An attention module cannot take the pack's processor (diffusers host)."""
