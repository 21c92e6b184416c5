"""Edge alignment: precision / recall / F1 of generated images' edges against the condition."""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


# --------------------------------------------------------------------------------------------
# Edge alignment
# --------------------------------------------------------------------------------------------
def _edge_maps(x, name: str) -> Tensor:
    t = torch.from_numpy(np.asarray(x)) if not isinstance(x, Tensor) else x
    if t.dtype != torch.bool:
        raise ValueError(f"{name}: expected a bool edge map, got {t.dtype} (threshold it first)")
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3:
        raise ValueError(f"{name}: expected [N, H, W] or [H, W], got shape {tuple(t.shape)}")
    return t


def edge_prf_per_image(pred, ref, tolerance: int = 1) -> dict[str, np.ndarray]:
    """Per-image edge precision, recall and F1 (float64 [N] each); see ``edge_prf``."""
    p, r = _edge_maps(pred, "pred"), _edge_maps(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(f"pred {tuple(p.shape)} and ref {tuple(r.shape)} differ in shape")
    if not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"tolerance must be an integer >= 0 (pixels), got {tolerance!r}")
    r = r.to(p.device)
    k = 2 * tolerance + 1

    def dilate(m: Tensor) -> Tensor:
        # square max-pool = dilation by the Chebyshev ball of radius `tolerance`
        return F.max_pool2d(m[:, None].float(), k, stride=1, padding=tolerance)[:, 0] > 0

    n_pred = p.flatten(1).sum(1).double()                              # [N]
    n_ref = r.flatten(1).sum(1).double()
    hit_pred = (p & dilate(r)).flatten(1).sum(1).double()             # predicted near a ref edge
    hit_ref = (r & dilate(p)).flatten(1).sum(1).double()              # ref near a predicted edge
    both_empty = (n_pred == 0) & (n_ref == 0)
    # An empty denominator counts as success only when both maps are empty (perfect agreement);
    # otherwise 0, so a blank prediction is never rewarded with precision 1.
    prec = torch.where(n_pred > 0, hit_pred / n_pred.clamp(min=1), both_empty.double())
    rec = torch.where(n_ref > 0, hit_ref / n_ref.clamp(min=1), both_empty.double())
    f1 = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec).clamp(min=1e-12),
                     torch.zeros_like(prec))
    return {"precision": prec.cpu().numpy(), "recall": rec.cpu().numpy(), "f1": f1.cpu().numpy()}


def edge_prf(pred, ref, tolerance: int = 1) -> dict:
    """Edge alignment of predicted vs reference edge maps (bool [N, H, W] or [H, W]).

    precision = fraction of predicted edge pixels within ``tolerance`` px (Chebyshev distance,
    i.e. the (2 tol + 1)^2 square) of a reference edge pixel; recall = fraction of reference
    edge pixels within ``tolerance`` of a predicted one; F1 = 2PR / (P + R) (0 if P = R = 0).
    Each is computed per image and then averaged over images ("n" = number of images, for
    weighting partial results). Empty maps: both empty -> P = R = F1 = 1; only one empty ->
    P = R = F1 = 0.
    """
    per = edge_prf_per_image(pred, ref, tolerance)
    out = {k: float(v.mean()) if v.size else float("nan") for k, v in per.items()}
    out["n"] = int(per["f1"].size)
    return out
