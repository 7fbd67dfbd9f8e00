"""Probe for issue #13: more smoothing of the output map (pixel AUROC; selection on validation only).

The map is blurred with sigma = 4 before the score and the output. Blurring the committed graph's
output map again with sigma_e gives the map a total sigma of sqrt(16 + sigma_e^2) (Gaussians compose).
The image score is not changed here (it is computed from the pixel-normalised map inside the graph).

    PYTHONPATH=training python training/scripts/probe_blur.py    # needs /tmp/pd/cache.npz (probe_patch_density.py cache)
"""
import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from dcam.anomaly_map import GaussianBlur
from dcam.evaluate import au_pro

torch.set_num_threads(1)
C = ["bottle", "magnetic_tile"]
d = dict(np.load("/tmp/pd/cache.npz"))


def blurred(maps, sigma):
    if not sigma:
        return maps.astype(np.float32)
    b = GaussianBlur(sigma)
    return np.concatenate([b(torch.from_numpy(maps[i:i + 32].astype(np.float32))[:, None]).squeeze(1).numpy()
                           for i in range(0, len(maps), 32)])


sub = (slice(None), slice(None, None, 2), slice(None, None, 2))
for sigma in (0, 2, 4, 8):
    row = []
    for c in C:
        g, b = d["val_cls"] == c, d["v2_cls"] == c
        vm = blurred(np.concatenate([d["val_map"][g], d["v2_map"][b]]), sigma)
        vk = np.concatenate([np.zeros((g.sum(), 256, 256), bool), d["v2_masks"][b]])
        t = d["test_cls"] == c
        tm, tk = blurred(d["test_map"][t], sigma), d["test_masks"][t]
        row.append((100 * roc_auc_score(vk[sub].ravel(), vm[sub].ravel()), 100 * roc_auc_score(tk[sub].ravel(), tm[sub].ravel()),
                    100 * au_pro(tk, tm)))
    print(f"extra sigma {sigma} (total {np.hypot(4, sigma):.1f}): val P-AUROC {row[0][0]:.1f} / {row[1][0]:.1f} / "
          f"{(row[0][0] + row[1][0]) / 2:.1f}   test P-AUROC {row[0][1]:.1f} / {row[1][1]:.1f} / {(row[0][1] + row[1][1]) / 2:.1f}"
          f"   test AU-PRO {row[0][2]:.1f} / {row[1][2]:.1f} / {(row[0][2] + row[1][2]) / 2:.1f}", flush=True)
