"""Removable instance-level wrappers of bound methods."""

from __future__ import annotations

from tokprune.errors import PatchedModelError


class InstanceWrap:
    """Removable wrapper of one bound method on one instance (never on the class)."""

    def __init__(self, owner, name: str, wrapper) -> None:
        self.owner, self.name = owner, name
        setattr(owner, name, wrapper)

    def remove(self) -> None:
        self.owner.__dict__.pop(self.name, None)


def refuse_copies(model) -> InstanceWrap:
    """Make deepcopy and pickle of the patched `model` fail with a clear error (both look `__reduce_ex__` up
    on the instance): a deep copy would keep hooks and wrappers bound to the original model, so its
    generate() would run the original, and pickle would fail on the hooks without saying why."""

    def refuse(protocol: int = 2):
        raise PatchedModelError(
            "a model patched by tokprune cannot be copied or pickled: its hooks are bound to this instance (a deep "
            "copy's generate() would run the original). Copy or save it before tokprune.apply or after "
            ".remove(), and apply tokprune to each copy; state_dict() is unaffected"
        )

    return InstanceWrap(model, "__reduce_ex__", refuse)
