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


def parse_option(enum_cls, value, option: str, what: str):
    """``enum_cls(value)``, or a ``SettingsError`` naming the option and the accepted values."""
    try:
        return enum_cls(value)
    except ValueError:
        raise SettingsError(f"{option}={value!r} is not {what}; expected one of {[m.value for m in enum_cls]}.") from None
