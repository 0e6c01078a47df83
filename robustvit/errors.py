"""Exceptions raised by robustvit."""


class UnsupportedModuleError(TypeError):
    """A module robustvit cannot convert or bound.

    Raised instead of guessing: nothing is ever silently assumed 1-Lipschitz.
    The message names the module's path and type.
    """


class CertificateError(ValueError):
    """A certificate is missing, malformed, or does not match the model it claims to certify."""
