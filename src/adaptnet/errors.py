"""Errors shared by every layer of adaptnet (imported by nn, edit and above)."""


class EditError(ValueError):
    """A structural edit was refused; the message says what to fix.

    Raised before anything changes (or after a full rollback), so the model and the
    optimizer are exactly as they were.
    """
