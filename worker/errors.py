"""One exception root for refold, with a small subclass per concern.

Everything refold raises on purpose derives from :class:`RefoldError`, so an
operator's wrapper can catch the whole family at once while tests can assert
the precise kind.
"""

from __future__ import annotations


class RefoldError(Exception):
    """Root of every error refold raises on purpose."""


class ConfigError(RefoldError):
    """A setting or a column mapping is missing or inconsistent."""


class DataError(RefoldError):
    """Input data (Parquet logs, metadata, reactions) cannot be used."""


class ModelError(RefoldError):
    """A model directory is missing, corrupt, partial or of the wrong version."""


class DecodeError(RefoldError):
    """A Kafka message could not be decoded into its wire model.

    The loop catches it and dead-letters the original bytes; it never stops the worker.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class BrokerError(RefoldError):
    """A broker could not be started, reached or stopped."""


class StateError(RefoldError):
    """Durable user state could not be restored or written."""


class ArchiveError(RefoldError):
    """The archive directory cannot be read or written consistently."""
