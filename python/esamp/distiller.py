"""esamp.Distiller: a bank of S online-trained distillers (SPEC 2, 7) backed by torch.ops.esamp.*."""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Union

import torch

from . import _ops

SlotArg = Union[int, Iterable[int], torch.Tensor]

_STATE_KEYS = ("A", "G", "B", "c", "gamma")


class Distiller:
    """A bank of ``slots`` distillers y = RMSNorm(x_L) * gamma with L low-rank gated residual blocks.

    Parameters and Adam state are float32 and live in flat ``[S, P]`` tensors (layout in
    csrc/include/esamp/distiller.h).  ``train_step`` takes one clipped Adam step for every slot that
    has at least one finite row in the batch and returns the per-slot losses (NaN for idle slots).
    """

    def __init__(self, hidden_size: int, rank: int = 64, layers: int = 2, slots: int = 1, *, lr: float = 4e-4,
                 adam_eps: float = 1e-4, clip: float = 0.5, betas=(0.9, 0.999), norm_eps: float = 1e-6,
                 device: Union[str, torch.device] = "cpu", seed: int = 0,
                 gamma_init: Optional[torch.Tensor] = None):
        for name, v, lo in (("hidden_size", hidden_size, 1), ("rank", rank, 1), ("layers", layers, 1),
                            ("slots", slots, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
        if not (lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"lr: expected a finite value >= 0, got {lr!r}")
        if not (adam_eps > 0 and math.isfinite(adam_eps)):
            raise ValueError(f"adam_eps: expected a finite value > 0, got {adam_eps!r}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas: expected two values in [0, 1), got {betas!r}")
        self.hidden_size, self.rank, self.layers, self.slots = hidden_size, rank, layers, slots
        self.lr, self.adam_eps, self.clip, self.betas, self.norm_eps = lr, adam_eps, clip, tuple(betas), norm_eps
        self.seed = int(seed)
        self.device = torch.device(device)
        self.params_per_slot = layers * (3 * hidden_size * rank + rank) + hidden_size
        P = self.params_per_slot
        self.params = torch.empty(slots, P, dtype=torch.float32, device=self.device)
        self.exp_avg = torch.zeros_like(self.params)
        self.exp_avg_sq = torch.zeros_like(self.params)
        self.step = torch.zeros(slots, dtype=torch.int64, device=self.device)
        # (rows trained, rows skipped, loss sum, steps), accumulated on the device.
        self.counters = torch.zeros(4, dtype=torch.float64, device=self.device)
        if gamma_init is not None:
            gamma_init = torch.as_tensor(gamma_init).detach().to(self.device, torch.float32).contiguous()
            if gamma_init.shape != (hidden_size,):
                raise ValueError(f"gamma_init: expected shape ({hidden_size},), got {tuple(gamma_init.shape)}")
        self.gamma_init = gamma_init
        self.reset(torch.arange(slots))

    # ---------------------------------------------------------------- helpers
    def _slot_tensor(self, slot_ids: SlotArg, name: str = "slot_ids") -> torch.Tensor:
        if isinstance(slot_ids, torch.Tensor):
            t = slot_ids
            if t.dtype.is_floating_point or t.dtype == torch.bool:
                raise TypeError(f"{name}: expected an integer tensor, got {t.dtype}")
            t = t.reshape(-1).to(self.device, torch.int64)
        elif isinstance(slot_ids, int) and not isinstance(slot_ids, bool):
            t = torch.tensor([slot_ids], dtype=torch.int64, device=self.device)
        else:
            t = torch.tensor(list(slot_ids), dtype=torch.int64, device=self.device)
        return t.contiguous()

    @property
    def nbytes_per_slot(self) -> int:
        """Bytes of parameters + Adam state (exp_avg, exp_avg_sq) + step counter for one slot."""
        return 3 * 4 * self.params_per_slot + 8

    # ---------------------------------------------------------------- ops
    def forward(self, x: torch.Tensor, slot_ids: SlotArg, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Predictions [N, H] for rows x [N, H] with per-row slot ids (output in x's dtype by default)."""
        return _ops.distiller_forward(self.params, x, self._slot_tensor(slot_ids), rank=self.rank,
                                      layers=self.layers, norm_eps=self.norm_eps, out_dtype=out_dtype)

    __call__ = forward

    def train_step(self, x: torch.Tensor, t: torch.Tensor, slot_ids: SlotArg,
                   losses: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One optimizer step on rows (x, t); returns float32 [S] losses (NaN for slots with no valid row).

        No host synchronisation: the losses and the counters stay on the device.
        """
        if losses is None:
            losses = torch.empty(self.slots, dtype=torch.float32, device=self.device)
        _ops.distiller_train_step(self.params, self.exp_avg, self.exp_avg_sq, self.step, losses, self.counters, x, t,
                                  self._slot_tensor(slot_ids), rank=self.rank, layers=self.layers,
                                  norm_eps=self.norm_eps, lr=self.lr, beta1=self.betas[0], beta2=self.betas[1],
                                  adam_eps=self.adam_eps, clip=self.clip)
        return losses

    def reset(self, slot_ids: SlotArg) -> None:
        """Re-initialise parameters AND optimizer state (and step counter) of these slots only."""
        _ops.distiller_reset(self.params, self.exp_avg, self.exp_avg_sq, self.step, self._slot_tensor(slot_ids),
                             hidden_size=self.hidden_size, rank=self.rank, layers=self.layers, seed=self.seed,
                             gamma_init=self.gamma_init)

    def stats(self) -> Dict[str, float]:
        """Counters as Python numbers (this reads the device: a host synchronisation)."""
        c = self.counters.tolist()
        return {"rows_trained": int(c[0]), "rows_skipped": int(c[1]), "loss_sum": c[2], "steps": int(c[3])}

    # ---------------------------------------------------------------- state
    def _views(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        H, R, L = self.hidden_size, self.rank, self.layers
        blk = 3 * H * R + R
        body = flat[: L * blk].view(L, blk)
        W1 = body[:, : 2 * H * R].view(L, H, 2 * R)
        return {
            "A": W1[:, :, :R],
            "G": W1[:, :, R:],
            "c": body[:, 2 * H * R: 2 * H * R + R],
            "B": body[:, 2 * H * R + R:].view(L, R, H),
            "gamma": flat[L * blk:],
        }

    def _check_slot(self, s: int) -> int:
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < self.slots:
            raise ValueError(f"slot: expected an int in [0, {self.slots}), got {s!r}")
        return s

    def slot_state_dict(self, s: int) -> Dict[str, torch.Tensor]:
        """Float32 copies {"A": [L,H,R], "G": [L,H,R], "B": [L,R,H], "c": [L,R], "gamma": [H]} of slot s."""
        v = self._views(self.params[self._check_slot(s)])
        return {k: v[k].clone() for k in _STATE_KEYS}

    def load_slot_state_dict(self, s: int, sd: Dict[str, torch.Tensor]) -> None:
        """Inverse of slot_state_dict; the slot's optimizer state and step counter are reset."""
        s = self._check_slot(s)
        v = self._views(self.params[s])
        missing = [k for k in _STATE_KEYS if k not in sd]
        if missing:
            raise KeyError(f"sd: missing keys {missing}; expected {list(_STATE_KEYS)}")
        for k in _STATE_KEYS:
            src = torch.as_tensor(sd[k])
            if tuple(src.shape) != tuple(v[k].shape):
                raise ValueError(f"sd[{k!r}]: expected shape {tuple(v[k].shape)}, got {tuple(src.shape)}")
        with torch.no_grad():
            for k in _STATE_KEYS:
                v[k].copy_(torch.as_tensor(sd[k]).to(self.device, torch.float32))
            self.exp_avg[s].zero_()
            self.exp_avg_sq[s].zero_()
            self.step[s] = 0

    def config(self) -> Dict[str, object]:
        return {"hidden_size": self.hidden_size, "rank": self.rank, "layers": self.layers, "slots": self.slots,
                "lr": self.lr, "adam_eps": self.adam_eps, "clip": self.clip, "betas": list(self.betas),
                "norm_eps": self.norm_eps, "seed": self.seed}

    def state_dict(self) -> Dict[str, object]:
        """The whole bank: config, parameters, Adam state, step counters and counters (CPU copies)."""
        return {"config": self.config(), "params": self.params.cpu().clone(), "exp_avg": self.exp_avg.cpu().clone(),
                "exp_avg_sq": self.exp_avg_sq.cpu().clone(), "step": self.step.cpu().clone(),
                "counters": self.counters.cpu().clone(),
                "gamma_init": None if self.gamma_init is None else self.gamma_init.cpu().clone()}

    def load_state_dict(self, sd: Dict[str, object]) -> None:
        cfg = sd.get("config") if isinstance(sd, dict) else None
        if not isinstance(cfg, dict):
            raise ValueError("state_dict: expected a dict produced by Distiller.state_dict() (missing 'config')")
        for k in ("hidden_size", "rank", "layers", "slots"):
            if cfg.get(k) != getattr(self, k):
                raise ValueError(f"state_dict: {k} mismatch: this distiller has {k}={getattr(self, k)}, "
                                 f"the state has {k}={cfg.get(k)}")
        missing = [k for k in ("params", "exp_avg", "exp_avg_sq", "step", "counters") if k not in sd]
        if missing:
            raise ValueError(f"state_dict: missing keys {missing}")
        with torch.no_grad():
            for k in ("params", "exp_avg", "exp_avg_sq", "step", "counters"):
                dst = getattr(self, k)
                src = torch.as_tensor(sd[k])
                if src.shape != dst.shape:
                    raise ValueError(f"state_dict[{k!r}]: expected shape {tuple(dst.shape)}, got {tuple(src.shape)}")
                dst.copy_(src.to(dst.device, dst.dtype))
        # Later resets must re-create the saved bank's initial state, not this instance's.
        self.seed = int(cfg.get("seed", self.seed))
        gi = sd.get("gamma_init")
        self.gamma_init = None if gi is None else torch.as_tensor(gi).to(self.device, torch.float32).contiguous()

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path) -> None:
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def __repr__(self) -> str:
        return (f"Distiller(hidden_size={self.hidden_size}, rank={self.rank}, layers={self.layers}, "
                f"slots={self.slots}, device={self.device}, nbytes_per_slot={self.nbytes_per_slot})")
