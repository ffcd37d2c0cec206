"""Distiller slots of an SGLang engine: a request group (a request, or the n samples of an ``n > 1`` request, which
share a group id) holds one slot while any member is alive; when the last member finishes or is aborted the slot is
reset (parameters and optimizer state) and returned to the pool.

Pure Python.  (esamp.integrations.vllm._slots.SlotManager derives the group from vLLM's child request ids; SGLang's
children carry no such id, so here the group is passed explicitly.  The two are meant to merge into the adapters'
common core.)
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional


class SlotManager:
    def __init__(self, num_slots: int, *, shared: bool = False,
                 on_reset: Optional[Callable[[List[int]], None]] = None):
        if not isinstance(num_slots, int) or isinstance(num_slots, bool) or num_slots < 1:
            raise ValueError(f"num_slots: expected an int >= 1, got {num_slots!r}")
        self.num_slots = num_slots
        self.shared = shared
        self._on_reset = on_reset
        self._free: List[int] = list(range(num_slots - 1, -1, -1))  # pop() gives the lowest id
        self._group_slot: Dict[str, int] = {}
        self._group_members: Dict[str, set] = {}
        self._req_group: Dict[str, str] = {}
        self.acquired = 0
        self.exhausted = 0
        self.resets = 0

    def acquire(self, req_id: str, group: Optional[str] = None) -> int:
        """The slot of req_id's group (the lowest free slot for a new group), or -1 when all are taken."""
        if req_id in self._req_group:
            return self._group_slot[self._req_group[req_id]]
        g = "__shared__" if self.shared else ("r:" + req_id if group is None else "g:" + group)
        if g not in self._group_slot:
            if self.shared:
                self._group_slot[g] = 0
            elif not self._free:
                self.exhausted += 1
                return -1
            else:
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

    def group_of(self, req_id: str) -> Optional[str]:
        return self._req_group.get(req_id)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._req_group

    @property
    def slots_in_use(self) -> int:
        return len(self._group_slot)

    @property
    def live_requests(self) -> int:
        return len(self._req_group)
