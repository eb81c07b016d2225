"""Loading an HF id that is no local folder: fail at once where the Hub cannot serve it.

huggingface_hub retries a failed request five times with backoff (1 + 2 + 4 + 8 + 8 s) and transformers
asks for several files, so an unreachable Hub used to cost minutes before the error. Here one request
with a short timeout decides first: offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) or an
unreachable Hub is an immediate CliError unless the checkpoint is in the local cache, which is then used
without any request.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tokprune.cli.arguments import CliError

PROBE_TIMEOUT_S = 5.0


def is_cached(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds `repo_id`'s config.json (a checkpoint downloaded before)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id (e.g. "a/b/c")
        return False


def unreachable(endpoint: str) -> str | None:
    """Why `endpoint` cannot be reached from here (one HEAD request, no retries), or None if it answers
    (any HTTP status counts as an answer)."""
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
    except Exception as error:  # any failure of this one request: DNS, refused, timeout, proxy, TLS
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return None


def _refusal(name: str, cache: str, why: str) -> CliError:
    return CliError(
        f"cannot load {name!r}: it is no local folder, it is not in the Hugging Face cache ({cache}), and "
        f"{why}; give a local folder, or download it first on a machine with network (hf download {name})"
    )


@contextmanager
def hub_access(name: str) -> Iterator[None]:
    """Around loading the HF id `name`: a CliError at once when offline mode is on or the Hub cannot be
    reached and the cache lacks `name`; with the Hub unreachable and `name` cached, offline mode for the
    duration (no retries), restored afterwards."""
    from huggingface_hub import constants

    cached = is_cached(name)
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise _refusal(
                name, constants.HF_HUB_CACHE, "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"
            )
        yield
        return
    reason = unreachable(constants.ENDPOINT)
    if reason is None:
        yield
        return
    if not cached:
        raise _refusal(name, constants.HF_HUB_CACHE, f"{constants.ENDPOINT} cannot be reached ({reason})")
    print(
        f"tokprune: {constants.ENDPOINT} cannot be reached ({reason}); using the cached {name}",
        file=sys.stderr,
    )
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False
