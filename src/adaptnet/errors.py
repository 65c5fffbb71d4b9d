"""Errors shared by every layer of adaptnet (imported by nn, edit and above)."""


class EditError(ValueError):
    """A structural edit was refused; the message says what to fix.

    Raised before anything changes (or after a full rollback), so the model and the
    optimizer are exactly as they were.
    """


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message names the file or value at fault.

    Raised by ``adaptnet.train.checkpoint`` (and re-exported there). When saving, nothing
    was written; when loading, nothing was changed.
    """
