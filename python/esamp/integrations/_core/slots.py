"""Distiller slot management: a request group (a request and all n of its samples) holds one slot while any
of its members is alive; the slot is reset and returned to the pool when the last member finishes.

Pure Python (no torch, no engine) so that the policy is testable on its own.  Which requests form a group is
the engine's convention: either derived from the request id by ``group_key(req_id) -> key`` (vLLM:
``esamp.integrations.vllm._common.group_key``, from its child request ids), or passed explicitly as
``acquire(req_id, group)`` (SGLang, whose children carry no such id).
"""
from __future__ import annotations

from typing import Callable, Dict, Hashable, List, Optional


def _identity(req_id: str) -> str:
    return req_id


class SlotManager:
    """Maps request ids to distiller slots.

    ``acquire(req_id[, group])`` returns the slot of the request's group (allocating the lowest free slot for a
    new group) or -1 when every slot is taken.  ``release(req_id)`` drops the request; when it was the last
    member of its group the slot is reset through ``on_reset([slot])`` and becomes free again.
    In shared mode every request gets slot 0 and nothing is ever reset.
    """

    def __init__(self, num_slots: int, *, shared: bool = False,
                 on_reset: Optional[Callable[[List[int]], None]] = None,
                 group_key: Callable[[str], str] = _identity):
        if not isinstance(num_slots, int) or isinstance(num_slots, bool) or num_slots < 1:
            raise ValueError(f"num_slots: expected an int >= 1, got {num_slots!r}")
        self.num_slots = num_slots
        self.shared = shared
        self._on_reset = on_reset
        self.group_key = group_key
        self._free: List[int] = list(range(num_slots - 1, -1, -1))  # pop() gives the lowest id
        self._group_slot: Dict[Hashable, int] = {}
        self._group_members: Dict[Hashable, set] = {}
        self._req_group: Dict[str, Hashable] = {}
        self.acquired = 0
        self.exhausted = 0
        self.resets = 0

    def acquire(self, req_id: str, group: Optional[str] = None) -> int:
        """The slot of req_id's group -- ``group`` when given, else ``group_key(req_id)`` -- or -1 when every slot
        is taken.  A request already holding a slot keeps it (e.g. re-added by a streaming input update)."""
        if req_id in self._req_group:
            return self._group_slot[self._req_group[req_id]]
        if self.shared:
            self._req_group[req_id] = "__shared__"
            self._group_slot["__shared__"] = 0
            self._group_members.setdefault("__shared__", set()).add(req_id)
            self.acquired += 1
            return 0
        # explicit groups and derived keys live in separate name spaces
        g = ("group", group) if group is not None else ("key", self.group_key(req_id))
        if g not in self._group_slot:
            if not self._free:
                self.exhausted += 1
                return -1
            self._group_slot[g] = self._free.pop()
            self._group_members[g] = set()
        self._group_members[g].add(req_id)
        self._req_group[req_id] = g
        self.acquired += 1
        return self._group_slot[g]

    def release(self, req_id: str) -> Optional[int]:
        """Drops req_id; returns the slot that was reset and freed, if any (None: unknown id, other members alive,
        or shared mode)."""
        g = self._req_group.pop(req_id, None)
        if g is None:
            return None
        members = self._group_members[g]
        members.discard(req_id)
        if members or self.shared:
            return None
        slot = self._group_slot.pop(g)
        del self._group_members[g]
        if self._on_reset is not None:
            self._on_reset([slot])
        self.resets += 1
        self._free.append(slot)
        self._free.sort(reverse=True)
        return slot

    def slot_of(self, req_id: str) -> int:
        g = self._req_group.get(req_id)
        return -1 if g is None else self._group_slot[g]

    def group_of(self, req_id: str) -> Optional[Hashable]:
        """The group key of a live request (an opaque hashable), or None."""
        return self._req_group.get(req_id)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._req_group

    @property
    def slots_in_use(self) -> int:
        return len(self._group_slot)

    @property
    def live_requests(self) -> int:
        return len(self._req_group)
