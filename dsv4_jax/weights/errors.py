"""The error every checkpoint reader and writer raises for bad files and bad arguments about them."""


class CheckpointError(ValueError):
    """A missing, unexpected, misshapen or unreadable checkpoint tensor or file."""
