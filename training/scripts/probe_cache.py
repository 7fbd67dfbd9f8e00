"""Probe cache (not committed): committed-ONNX maps + pooled teacher features under 8 views."""
import sys, time, numpy as np, torch, torchvision
torch.set_num_threads(1)
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from dcam.data import load_train_val, load_test, resolve_data_root, synthetic_defects, synthetic_anomalies
from dcam.backbones import find_packaged_weights
from dcam.torch_model import Normalize
from dcam.export import run_onnx
import onnxruntime as ort

root = resolve_data_root(None); classes = ["bottle", "magnetic_tile"]; S = 256
tr, va = load_train_val(root, classes, S, 0.15, 0, False)
te = load_test(root, classes, S, False)
v2, v2m, v2c, v2k = synthetic_defects(va.images, va.classes, per_image=2, seed=7)
v1, v1m = synthetic_anomalies(va.images, seed=123)
np.savez("/tmp/cache/meta.npz", tr_cls=tr.classes, va_cls=va.classes, te_cls=te.classes, te_lab=te.labels,
         te_def=te.defects, v2m=v2m, v2c=v2c, v2k=v2k, v1m=v1m, te_masks=te.masks)
sets = {"train": tr.images, "val": va.images, "v2": v2, "v1": v1, "test": te.images}
print("loaded", {k: len(v) for k, v in sets.items()}, flush=True)
t0 = time.time()
opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
sess = ort.InferenceSession("/work/wt-train/models/dcam.onnx", opts, providers=["CPUExecutionProvider"])
for k in ("val", "v2", "v1", "test"):
    ms, ss = [], []
    for i in range(0, len(sets[k]), 16):
        m, s = sess.run(None, {"image": sets[k][i:i + 16]}); ms.append(m.astype(np.float16)); ss.append(s)
    np.savez(f"/tmp/cache/map_{k}.npz", maps=np.concatenate(ms), scores=np.concatenate(ss))
    print("maps", k, time.time() - t0, flush=True)
net = torchvision.models.mobilenet_v2(weights=None)
net.load_state_dict(torch.load(find_packaged_weights("mobilenet_v2"), map_location="cpu", weights_only=True)); net.eval()
f = net.features
stages = [f[:4], f[4:7], f[7:14], f[14:17], f[17], f[18]]
norm = Normalize()
VIEWS = [(0, False), (0, True), (1, False), (1, True), (2, False), (2, True), (3, False), (3, True)]
@torch.no_grad()
def pooled(x):
    out = []
    for st in stages:
        x = st(x); out.append(x.mean(dim=(2, 3)))
    return out
for k in ("val", "v2", "v1", "test", "train"):
    res = {v: [[] for _ in stages] for v in range(8)}
    for i in range(0, len(sets[k]), 32):
        x = norm(torch.from_numpy(sets[k][i:i + 32]))
        for vi, (r, fl) in enumerate(VIEWS):
            xv = torch.rot90(x, r, dims=(2, 3))
            if fl: xv = torch.flip(xv, dims=(3,))
            for j, p in enumerate(pooled(xv)): res[vi][j].append(p.numpy())
    np.savez(f"/tmp/cache/feat_{k}.npz", **{f"v{v}_s{j}": np.concatenate(res[v][j]) for v in range(8) for j in range(len(stages))})
    print("feats", k, time.time() - t0, flush=True)
