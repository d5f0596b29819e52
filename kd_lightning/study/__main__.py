"""``python -m kd_lightning.study``: the same as ``kd-lightning-study``."""

from kd_lightning.study.cli import cli

if __name__ == "__main__":  # pragma: no cover
    cli()
