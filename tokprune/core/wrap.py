"""Removable instance-level wrappers of bound methods."""

from __future__ import annotations


class InstanceWrap:
    """Removable wrapper of one bound method on one instance (never on the class)."""

    def __init__(self, owner, name: str, wrapper) -> None:
        self.owner, self.name = owner, name
        setattr(owner, name, wrapper)

    def remove(self) -> None:
        self.owner.__dict__.pop(self.name, None)
