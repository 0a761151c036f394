"""What the tasks whose output is content-addressed in the store share: a reused
output is shown as Cached."""

from __future__ import annotations

from typing import Any

from prefect.states import Completed, State


def reused(value: Any, message: str) -> State:
    """What a task returns when it found its output already in the store and
    verified: ``value`` in a COMPLETED state named Cached, which the UI and the API
    show instead of Completed. Prefect hands a returned State as is to a plain
    call, so callers take ``task(..., return_state=True).result()``: the value,
    whether the task reused its output or made it."""
    return Completed(data=value, name="Cached", message=message)
