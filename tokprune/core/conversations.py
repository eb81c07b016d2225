"""Per-conversation state: what a pruned prefill leaves for the forwards that continue its KV cache.

A conversation is one cache object. The engine keeps its state *on that object* (an attribute holding one
`Conversation` per engine), so any number of conversations interleave on one patched model, each continuing
its own prefill's masks and numbering; a deep copy of a cache (one prefix continued several ways) carries a
copy of the state, and a cache the engine never pruned (made before `apply`, or by a text-only prompt) has
none and passes through untouched.

Calls into one patched model are serialised (`CallLock`): a forward, or a whole generate() call, holds the
model while it runs, so threads that share a patched model wait for each other and each gets the result it
would get alone. Hook state that lives for one forward only (the token map in flight, the ViT signals) is
therefore never seen by another call.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

import torch
from torch import nn

from tokprune.core.state import PrefillState
from tokprune.core.stats import PruneStats

ATTRIBUTE = "_tokprune_conversations"
_engine_keys = itertools.count()


@dataclass
class Conversation:
    """What the engine keeps between the forwards of one conversation.

    state: what the last pruned prefill (or follow-up turn) left for the steps after it; None: nothing
    pruned yet. position_shift: (B,) what to add to transformers' position ids after a turn that renumbered
    the sequence (M-RoPE follow-up turns, `positions="contiguous"`); None: nothing. stats: the stats of the
    conversation's last prefill or follow-up turn.
    """

    state: PrefillState | None = None
    position_shift: torch.Tensor | None = None
    stats: PruneStats | None = None


def new_engine_key() -> int:
    """A key that tells one engine's conversations from another's on the same cache object."""
    return next(_engine_keys)


def conversation_of(cache: object | None, key: int) -> Conversation | None:
    """The conversation engine `key` keeps on `cache` (None: no cache, or none kept there)."""
    if cache is None:
        return None
    return getattr(cache, ATTRIBUTE, {}).get(key)


def keep_on(cache: object | None, key: int, conversation: Conversation) -> None:
    """Keep `conversation` on `cache` for engine `key` (nothing without a cache: no step can follow)."""
    if cache is None:
        return
    kept = getattr(cache, ATTRIBUTE, None)
    if kept is None:
        try:
            kept = {}
            setattr(cache, ATTRIBUTE, kept)
        except AttributeError as error:  # a cache class with __slots__
            raise TypeError(
                f"tokprune keeps each conversation's state on its cache object, which "
                f"{type(cache).__name__} does not allow; use transformers' DynamicCache"
            ) from error
    kept[key] = conversation


def forget(cache: object | None, key: int) -> None:
    """Drop engine `key`'s conversation from `cache` (after `remove()`, a cache continues unpruned)."""
    kept = getattr(cache, ATTRIBUTE, None) if cache is not None else None
    if kept is not None:
        kept.pop(key, None)


class CallLock:
    """One call at a time through a patched model: the model's forward (a pre-hook and an always-called
    forward hook) and generate() hold a re-entrant lock, so a generate() call's forwards, or a forward's
    nested calls, run in the thread that holds it while another thread's call waits."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def install(self, model: nn.Module) -> list:
        """Hook `model`'s forward; returns the handles to remove."""
        enter = model.register_forward_pre_hook(self._enter)
        leave = model.register_forward_hook(self._leave, always_call=True)
        return [enter, leave]

    def _enter(self, module, args) -> None:
        self._lock.acquire()

    def _leave(self, module, args, output) -> None:
        self._lock.release()

    def __enter__(self) -> CallLock:
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


class ConversationHooks:
    """The conversation half of the engine (a mixin of `Engine`): which conversation the forward in flight
    continues, and the state the other hooks read through it (`state`, `_position_shift`)."""

    last_stats: PruneStats | None

    def _init_conversations(self) -> None:
        self.key = new_engine_key()  # tells this engine's conversations on a cache from another's
        self.conv = Conversation()  # the conversation of the forward in flight
        self._started = False  # a prefill's inner-model hook started its conversation

    @property
    def state(self) -> PrefillState | None:
        """What the current conversation's last pruned prefill left for the steps after it."""
        return self.conv.state

    @state.setter
    def state(self, value: PrefillState | None) -> None:
        self.conv.state = value

    @property
    def _position_shift(self) -> torch.Tensor | None:
        """(B,) what to add to transformers' position ids in the current conversation (M-RoPE families after
        a renumbered follow-up turn, the reproduction mode's contiguous numbering); None: nothing."""
        return self.conv.position_shift

    @_position_shift.setter
    def _position_shift(self, value: torch.Tensor | None) -> None:
        self.conv.position_shift = value

    def _continue_conversation(self, cache) -> None:
        """Make the conversation kept on `cache` (a forward on a non-empty cache) the current one; a cache
        without one (never pruned by this engine) starts an empty one."""
        conv = conversation_of(cache, self.key)
        if conv is None:
            conv = Conversation()
            keep_on(cache, self.key, conv)
        self.conv = conv

    def _start_conversation(self, cache) -> None:
        """A prefill: a new conversation, kept on `cache` if one was given (else on the cache the LM makes,
        once its forward returns)."""
        self.conv = Conversation()
        keep_on(cache, self.key, self.conv)
        self._started = True  # this forward's conversation: the LM pre-hook must not start another

    def _record(self, stats: PruneStats) -> None:
        """The stats of the prefill (or follow-up turn) that just ran: the pruner's and its conversation's."""
        self.last_stats = self.conv.stats = stats
