"""Packaging. The metadata and the requirements are setup.cfg's; this file only maps the
top-level configs/ (where the shipped configs live and are edited) into the package as
dpjax.configs, so that a wheel ships them and one copy stays in the repository."""

from setuptools import find_packages, setup

CONFIGS = ["dpjax." + name for name in find_packages(include=["configs", "configs.*"])]

setup(
  packages=find_packages(include=["dpjax", "dpjax.*"]) + CONFIGS,
  package_dir={"dpjax.configs": "configs"},
)
