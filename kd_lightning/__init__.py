"""kd_lightning: a PyTorch Lightning research template for knowledge distillation."""

__version__ = "0.1.0"


class KDConfigError(ValueError):
    """A configuration or input problem that the user can fix.

    The CLI prints these as one paragraph (no traceback) and exits with status 2.
    """
