"""``python -m lightning_meta`` is the same as the ``lightning-meta`` command."""

from lightning_meta.cli import console_main

if __name__ == "__main__":
    console_main()
