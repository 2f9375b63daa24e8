"""The checkout's top-level folders must not shadow an installed package: any Python started in the checkout (a
notebook, ``python -m pytest``) has the checkout's root first on ``sys.path``, so a top-level ``kernels/`` was
imported as Hugging Face's ``kernels`` (a transformers 5.25 dependency) and broke model loading."""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_top_level_package_shadows_an_installed_distribution():
    ours = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    installed = importlib.metadata.packages_distributions()
    # routelens itself is ours; every other import name an installed distribution provides must be free here
    clashes = {name: installed[name] for name in ours if name in installed and set(installed[name]) != {"routelens"}}
    assert not clashes, f"top-level folders that shadow installed packages: {clashes}"
