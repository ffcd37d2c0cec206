"""esamp.Trainer: the persistent trainer (SPEC 6) -- a distiller bank whose updates run off the caller's
critical path (CPU: a worker thread; CUDA: a dedicated high-priority stream ordered with events)."""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Union

import torch

from . import _ops  # noqa: F401  (loads the library that defines torch.classes.esamp.Trainer)

SlotArg = Union[int, Iterable[int], torch.Tensor]


class Trainer:
    """Owns a bank of ``slots`` distillers.

    * ``observe(x, t, slot_ids)`` copies the rows into a ring buffer and queues one optimizer step; it
      returns at once and the caller may reuse its buffers.
    * ``predict(x, slot_ids)`` sees every update queued before it (SPEC 6 ordering guarantee).
    * ``reset(slot_ids)`` is ordered with the updates.
    * ``stats()`` returns the device counters without waiting for queued work (CPU: as of the last
      finished update; CUDA: ordered after the last update on the trainer stream).
    """

    def __init__(self, hidden_size: int, rank: int = 64, layers: int = 2, slots: int = 1, *, lr: float = 4e-4,
                 adam_eps: float = 1e-4, clip: float = 0.5, betas=(0.9, 0.999), norm_eps: float = 1e-6,
                 device: Union[str, torch.device] = "cpu", seed: int = 0, ring_rows: int = 1024,
                 ring_segments: int = 4, gamma_init: Optional[torch.Tensor] = None):
        for name, v in (("hidden_size", hidden_size), ("rank", rank), ("layers", layers), ("slots", slots),
                        ("ring_rows", ring_rows), ("ring_segments", ring_segments)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.hidden_size, self.rank, self.layers, self.slots = hidden_size, rank, layers, slots
        self.params_per_slot = layers * (3 * hidden_size * rank + rank) + hidden_size
        if gamma_init is not None:
            gamma_init = torch.as_tensor(gamma_init).detach().to(self.device, torch.float32).contiguous()
            if gamma_init.shape != (hidden_size,):
                raise ValueError(f"gamma_init: expected shape ({hidden_size},), got {tuple(gamma_init.shape)}")
        self._impl = torch.classes.esamp.Trainer(hidden_size, rank, layers, slots, float(lr), float(adam_eps),
                                                 float(clip), float(betas[0]), float(betas[1]), float(norm_eps),
                                                 int(seed), str(self.device), ring_rows, ring_segments, gamma_init)

    def _slots(self, slot_ids: SlotArg) -> torch.Tensor:
        if isinstance(slot_ids, torch.Tensor):
            if slot_ids.dtype.is_floating_point or slot_ids.dtype == torch.bool:
                raise TypeError(f"slot_ids: expected an integer tensor, got {slot_ids.dtype}")
            return slot_ids.reshape(-1).to(self.device, torch.int64).contiguous()
        if isinstance(slot_ids, int) and not isinstance(slot_ids, bool):
            slot_ids = [slot_ids]
        return torch.tensor(list(slot_ids), dtype=torch.int64, device=self.device)

    @property
    def nbytes_per_slot(self) -> int:
        return 3 * 4 * self.params_per_slot + 8

    def predict(self, x: torch.Tensor, slot_ids: SlotArg) -> torch.Tensor:
        return self._impl.predict(x, self._slots(slot_ids))

    def observe(self, x: torch.Tensor, t: torch.Tensor, slot_ids: SlotArg) -> None:
        self._impl.observe(x, t, self._slots(slot_ids))

    def reset(self, slot_ids: SlotArg) -> None:
        self._impl.reset(self._slots(slot_ids))

    def synchronize(self) -> None:
        self._impl.synchronize()

    def pending(self) -> int:
        """Updates queued and not yet finished (CPU; always 0 on CUDA, where the stream holds them)."""
        return int(self._impl.pending())

    def stats_tensor(self) -> torch.Tensor:
        """float64 [4] (rows trained, rows skipped, loss sum, steps) -- no host sync on CUDA."""
        return self._impl.stats()

    def stats(self) -> Dict[str, float]:
        c = self._impl.stats().tolist()
        return {"rows_trained": int(c[0]), "rows_skipped": int(c[1]), "loss_sum": c[2], "steps": int(c[3])}

    def last_losses(self) -> torch.Tensor:
        """Per-slot losses of the last finished update (NaN for slots it did not train); synchronises."""
        return self._impl.last_losses()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        p, m, v, s, c = self._impl.state()
        return {"params": p.cpu().clone(), "exp_avg": m.cpu().clone(), "exp_avg_sq": v.cpu().clone(),
                "step": s.cpu().clone(), "counters": c.cpu().clone(),
                "config": {"hidden_size": self.hidden_size, "rank": self.rank, "layers": self.layers,
                           "slots": self.slots}}

    def load_state_dict(self, sd) -> None:
        cfg = sd.get("config", {}) if isinstance(sd, dict) else {}
        for k in ("hidden_size", "rank", "layers", "slots"):
            if cfg.get(k) != getattr(self, k):
                raise ValueError(f"state_dict: {k} mismatch: this trainer has {k}={getattr(self, k)}, "
                                 f"the state has {k}={cfg.get(k)}")
        names = ("params", "exp_avg", "exp_avg_sq", "step", "counters")
        missing = [n for n in names if n not in sd]
        if missing:
            raise ValueError(f"state_dict: missing keys {missing}")
        cur = self._impl.state()
        for name, dst in zip(names, cur):
            src = torch.as_tensor(sd[name])
            if src.shape != dst.shape:
                raise ValueError(f"state_dict[{name!r}]: expected shape {tuple(dst.shape)}, got {tuple(src.shape)}")
        self._impl.load_state([torch.as_tensor(sd[n]) for n in names])

    def __del__(self):
        impl = getattr(self, "_impl", None)
        if impl is not None:
            try:
                impl.synchronize()
            except Exception:
                pass
