"""The project's exceptions: one root, specific subclasses that also inherit builtins.

Every message names what failed, the offending value and what to do next.
"""

from __future__ import annotations


class ResumableError(Exception):
    """Root of every error this project raises on purpose."""


class InvalidSpec(ResumableError, ValueError):
    """A training spec or request that can never be valid."""


class UnknownRecipe(ResumableError, LookupError):
    """A recipe name or import path that does not resolve to a recipe."""


class DeviceUnavailable(ResumableError, RuntimeError):
    """The spec asks for a device this machine does not have."""


class OperationNotFound(ResumableError, LookupError):
    """No operation has this id, and no attempt of one has it either."""

    def __init__(self, operation_id: str) -> None:
        super().__init__(
            f"operation {operation_id!r} does not exist; list known operations with `resumable ops ls`"
        )
        self.operation_id = operation_id


class CheckpointNotFound(ResumableError, LookupError):
    """An operation has no good checkpoint (or the one asked for does not exist)."""

    def __init__(self, operation_id: str, detail: str = "") -> None:
        message = f"operation {operation_id!r} has no good checkpoint to resume from"
        if detail:
            message += f" ({detail})"
        message += "; start a new training run instead"
        super().__init__(message)
        self.operation_id = operation_id


class CheckpointCorrupted(ResumableError, ValueError):
    """A checkpoint whose files do not match its manifest, or cannot be read safely."""

    def __init__(self, checkpoint_id: str, reason: str) -> None:
        super().__init__(f"checkpoint {checkpoint_id} is corrupted: {reason}")
        self.checkpoint_id = checkpoint_id
        self.reason = reason


class UnsafeCheckpoint(CheckpointCorrupted):
    """A checkpoint file that would run code if it were unpickled; it is never loaded."""


class IncompatibleCheckpoint(ResumableError, ValueError):
    """A checkpoint written for another spec or model shape than the one restoring it."""

    def __init__(self, checkpoint_id: str, differences: list[str]) -> None:
        listed = "; ".join(differences)
        super().__init__(
            f"checkpoint {checkpoint_id} does not fit this spec: {listed}. "
            "Resume with the operation's own spec, or start a new operation"
        )
        self.checkpoint_id = checkpoint_id
        self.differences = differences


class NotResumable(ResumableError):
    """The operation exists but may not be resumed in its present state."""

    def __init__(self, operation_id: str, state: str, detail: str = "") -> None:
        message = f"operation {operation_id!r} is {state} and cannot be resumed"
        if detail:
            message += f": {detail}"
        super().__init__(message)
        self.operation_id = operation_id
        self.state = state


class NotCancellable(ResumableError):
    """The operation's latest attempt has already ended, so there is nothing to cancel."""


class ResumeConflict(NotResumable):
    """Another request already claimed the resume of this interrupted attempt."""

    def __init__(
        self, operation_id: str, winner: str, continuation: str | None
    ) -> None:
        detail = f"already resumed by {winner}"
        if continuation:
            detail += f" as flow run {continuation}"
        super().__init__(operation_id, "CLAIMED", detail)
        self.winner = winner
        self.continuation = continuation


class AnotherTrainerActive(ResumableError, RuntimeError):
    """A second run tried to train an operation that another run is training."""


class RunDeclaredLost(ResumableError, RuntimeError):
    """The server marked this run CRASHED while it was alive (its heartbeats stopped reaching it).

    Another run may already be continuing the operation, so this one stops at the next batch
    boundary and writes nothing more.
    """


class CheckpointSaveFailed(ResumableError, OSError):
    """A periodic checkpoint could not be saved and the policy says to stop."""


class CheckpointLocationInvalid(ResumableError, ValueError):
    """A checkpoint path that would escape the store's root."""
