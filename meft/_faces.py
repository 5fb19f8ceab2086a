"""Lazy public faces (PEP 562): a package lists its public names and the module that defines each one.

`import meft` (or a subpackage) then stays cheap and never initializes CUDA; a name is imported the first
time it is used. Every package face of meft uses this one helper.
"""

from __future__ import annotations

from importlib import import_module

__all__ = ["lazy_face"]


def lazy_face(package: str, where: dict[str, str], public: list[str]):
    """(__getattr__, __dir__) for `package`, resolving each name in `where` from its module on first use."""

    def __getattr__(name: str):
        if name in where:
            return getattr(import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(public) | set(where))

    return __getattr__, __dir__
