"""Errors a user can cause. The CLI catches `HwnasError` once and prints its one-line message."""


class HwnasError(Exception):
    """Base of every error that comes from bad input rather than a bug in hwnas."""


class ArchError(HwnasError):
    """An arch that does not belong to, or is not valid in, a search space."""


class DataError(HwnasError):
    """A dataset that is missing or malformed."""


class ProfileError(HwnasError):
    """A device profile (TOML) with a missing or invalid field."""


class LatencyTableError(HwnasError):
    """A latency table that is missing a key, is corrupt, or was measured elsewhere."""


class BudgetError(HwnasError):
    """A latency budget that no subnet of the space can meet."""


class CheckpointError(HwnasError):
    """A checkpoint that is corrupt or belongs to another space."""


class ExportError(HwnasError):
    """An export that cannot be done here (missing runtime) or failed verification."""


class DeviceError(HwnasError):
    """A torch device that is not one, or is not present here (`--device cuda` without a GPU)."""


class OutputError(HwnasError):
    """An output path that cannot be written: a file where a directory goes, a read-only or full filesystem."""

