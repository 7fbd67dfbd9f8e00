import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from probe_density import *
for name, st, div in (("deep undivided", [0,1,2,3,4,5], False), ("stride32 only /dim", [3,4,5], True), ("map+160+320 undivided", [0,1,2,3,4], False)):
    for nv in (1, 2):
        z = dens(st, nv, divide=div)
        print(name, nv, {k: round(v, 1) for k, v in img_metrics({k: v.min(1) for k, v in z.items()}).items()}, flush=True)
