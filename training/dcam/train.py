"""Training loop: one student for all classes pooled, frozen teacher features cached once."""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import trained_state, upgrade_state
from .torch_model import DistillModel


@torch.no_grad()
def cache_teacher(model: DistillModel, images: np.ndarray, batch_size: int = 32, progress: bool = True,
                  dtype: torch.dtype = torch.float16) -> list[torch.Tensor]:
    """Teacher maps for every image (the teacher is frozen and there is no augmentation, so computing
    them once saves a forward pass per training step). float16 halves the memory for training;
    evaluation caches use float32 so their maps equal the exported graph's."""
    chunks: list[list[torch.Tensor]] = []
    it = range(0, len(images), batch_size)
    for i in tqdm(it, desc="teacher cache", leave=False, disable=not progress):
        chunks.append([f.to(dtype) for f in model.teacher_features(torch.from_numpy(images[i:i + batch_size]))])
    return [torch.cat([c[k] for c in chunks]) for k in range(len(chunks[0]))] if chunks else []


@torch.no_grad()
def val_discrepancy(model: DistillModel, images: np.ndarray, t_cache: list[torch.Tensor], batch_size: int = 32) -> float:
    """Mean per-position 1 - cos between raw student and teacher on held-out good images
    (what the anomaly map measures; lower = better fit to normal data)."""
    model.eval()
    total = 0.0
    for i in range(0, len(images), batch_size):
        s_feats = model.student(model.normalize(torch.from_numpy(images[i:i + batch_size])))
        for t, s in zip(t_cache, s_feats):
            total += float((1 - F.cosine_similarity(t[i:i + batch_size].float(), s, dim=1)).mean(dim=(1, 2)).sum())
    return total / max(len(images), 1) / len(t_cache)


def train(model: DistillModel, train_images: np.ndarray, val_images: np.ndarray, epochs: int = 10,
          batch_size: int = 8, lr: float = 1e-3, seed: int = 0, max_steps: int | None = None,
          progress: bool = True, log=print, t_train: list | None = None, t_val: list | None = None,
          state_path=None, resume: bool = False) -> dict:
    """Adam + cosine LR decay; keeps the epoch with the lowest validation discrepancy.
    state_path: written after every epoch (weights, optimiser, scheduler, RNG, history, best);
    resume=True continues from it and gives the same weights as an uninterrupted run."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t_train = t_train if t_train is not None else cache_teacher(model, train_images, progress=progress)
    t_val = t_val if t_val is not None else cache_teacher(model, val_images, progress=progress)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(train_images) / batch_size)
    total_steps = min(epochs * steps_per_epoch, max_steps or 10 ** 12)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, total_steps) / total_steps)))
    history, best, step, t0, start = [], None, 0, time.time(), 0
    if resume and state_path is not None and Path(state_path).exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(upgrade_state(st["model"]), strict=False)
        opt.load_state_dict(st["opt"]); sched.load_state_dict(st["sched"])
        rng.bit_generator.state = st["np_rng"]; torch.set_rng_state(st["torch_rng"])
        history, best, step, start = st["history"], st["best"], st["step"], st["epoch"]
        log(f"resumed after epoch {start} (step {step})")
    for epoch in range(start, epochs):
        model.train()
        order = rng.permutation(len(train_images))
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not progress)
        run_loss, n_done = 0.0, 0
        for b in bar:
            if step >= total_steps:
                break
            idx = np.sort(order[b * batch_size:(b + 1) * batch_size])
            x = model.normalize(torch.from_numpy(train_images[idx]))
            t_feats = [t[idx].float() for t in t_train]
            loss, parts = model.loss(t_feats, model.student(x))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            run_loss += float(loss.detach())
            n_done += 1
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", **{k: f"{v:.3f}" for k, v in parts.items() if v})
        n_done = max(n_done, 1)
        val = val_discrepancy(model, val_images, t_val)
        history.append({"epoch": epoch + 1, "step": step, "train_loss": run_loss / n_done, "val_discrepancy": val,
                        "elapsed_s": round(time.time() - t0, 1)})
        if best is None or val < best[0]:
            best = (val, epoch + 1, copy.deepcopy(trained_state(model)))
        if state_path is not None:
            torch.save({"model": trained_state(model), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "np_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "history": history,
                        "best": best, "step": step, "epoch": epoch + 1}, state_path)
        log(f"epoch {epoch + 1}: train_loss={run_loss / n_done:.4f} val_discrepancy={val:.4f} ({time.time() - t0:.0f}s)")
        if step >= total_steps:
            break
    model.load_state_dict(upgrade_state(best[2]), strict=False)
    model.eval()
    return {"history": history, "best_epoch": best[1], "best_val_discrepancy": best[0],
            "steps": step, "train_time_s": round(time.time() - t0, 1)}

