"""Errors qkvconv raises on bad input. The CLI prints their message as one red line and exits 1."""


class QkvconvError(Exception):
    """Base class: a problem with the user's input or request; the message says what to do next."""


class CheckpointError(QkvconvError):
    """A checkpoint is missing, corrupt, unsafe to load, or an output path is taken."""


class UnsupportedArchitecture(QkvconvError):
    """The model's architecture has no spec in qkvconv.archs."""


class TransformError(QkvconvError):
    """A transform cannot apply to this model (e.g. a singular or non-square W_Q)."""


class VerificationError(QkvconvError):
    """A conversion that claims exactness failed its own check against the original."""


def first_line(e: BaseException) -> str:
    """The first line of a library's exception message (its type's name when it has none): what fits in qkvconv's
    one-line error."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# The signal that interrupted the running command (set by stream.interrupts_as_keyboard_interrupt's handler). A
# library can turn the KeyboardInterrupt raised inside its call into another exception (safetensors' slicing gives a
# ValueError); the CLI still reports an interrupt when this is set.
interrupted_by: list[int] = []
