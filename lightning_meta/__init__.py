"""lightning-meta: a PyTorch Lightning ecosystem for scalable meta-learning."""

from lightning_meta.episode import Episode, collate_episodes

__version__ = "0.1.0"

__all__ = ["Episode", "__version__", "collate_episodes"]


def _link_checkout_subpackages() -> None:
    """Find ``lightning_meta.datamodules``/``.callbacks`` when this package is a source checkout.

    ``datamodules/`` and ``callbacks/`` sit at the repository top level and are installed as
    subpackages (``package-dir`` in ``pyproject.toml``). An installed wheel has them inside
    ``lightning_meta/``, and an editable install maps them with its own finder. A checkout
    imported without either (``PYTHONPATH=.``, or ``python -m lightning_meta`` run from the
    repository root after a non-editable ``pip install .``, where the checkout shadows the
    installed copy) has neither, so this adds a last-resort finder that maps the two names to
    the sibling folders. It does nothing when the folders are not there.
    """
    import importlib.abc
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    mapped = {}
    for name in ("datamodules", "callbacks"):
        init = here.parent / name / "__init__.py"
        if not (here / name).is_dir() and init.is_file():
            mapped[f"{__name__}.{name}"] = init
    if not mapped or any(getattr(f, "_lightning_meta_checkout", False) for f in sys.meta_path):
        return

    class _CheckoutFinder(importlib.abc.MetaPathFinder):
        _lightning_meta_checkout = True

        def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001, ANN201
            init = mapped.get(fullname)
            if init is None:
                return None
            return importlib.util.spec_from_file_location(
                fullname, init, submodule_search_locations=[str(init.parent)]
            )

    # Appended: an editable install's finder (earlier in sys.meta_path) keeps precedence.
    sys.meta_path.append(_CheckoutFinder())


_link_checkout_subpackages()
del _link_checkout_subpackages
