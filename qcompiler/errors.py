"""Error classes.

Every problem the user can fix (a bad file, a bad option, a graph a target cannot
run) raises a :class:`UserError`; the CLI prints its message as one line and exits
with status 2. Anything else is a bug in qcompiler (status 1).
"""

from __future__ import annotations


class QCompilerError(Exception):
    """Base class of all errors raised on purpose by qcompiler."""

    exit_code = 1


class UserError(QCompilerError):
    """A problem with the input: the message says what and where."""

    exit_code = 2


class ModelFormatError(UserError):
    """The model file is missing, not ONNX, truncated or inconsistent."""


class UnsafeModelError(UserError):
    """The model asks for something we refuse to do (e.g. read outside its folder)."""


class UnsupportedOpError(UserError):
    """A node whose op type (or opset/domain) qcompiler does not implement."""


class ShapeError(UserError):
    """Shapes are missing, dynamic where static ones are needed, or absurd."""


class NumericsError(UserError):
    """Weights or data hold NaN/Inf, or a quantized range would overflow."""


class PipelineError(UserError):
    """A pipeline spec that does not parse, or names an unknown pass or option."""


class InputError(UserError):
    """Input arrays (to run a model or artifact) that do not match its inputs."""


class CalibrationDataError(InputError):
    """Calibration data that is missing, empty, or does not match the model's inputs."""


class TargetError(UserError):
    """Unknown target, or a graph the target cannot execute."""


class OutputDirError(UserError):
    """The output folder cannot be written as asked."""


class ClusterError(UserError):
    """The cluster (``--cluster``) cannot be reached or was lost."""


class PassFailure(QCompilerError):
    """A pass raised an unexpected exception (a bug); carries the reproducer path."""

    def __init__(self, pass_name: str, cause: BaseException, reproducer: str | None):
        self.pass_name = pass_name
        self.cause = cause
        self.reproducer = reproducer
        where = f"; reproducer saved in {reproducer}" if reproducer else ""
        super().__init__(f"pass '{pass_name}' failed: {type(cause).__name__}: {cause}{where}")


class RewriteDidNotConverge(QCompilerError):
    """The pattern rewriter hit its iteration cap."""
