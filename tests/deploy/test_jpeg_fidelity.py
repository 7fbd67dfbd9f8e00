"""scripts/jpeg_fidelity.py on a few real bottle images with the committed model: the table parses, and
what the operator's JPEG rule rests on holds (decoding at 1/8 straight to the model size moves good
frames' scores far more than stopping the IDCT at 4 x S; docs/DESIGN.md §8)."""

from __future__ import annotations

import re
import subprocess
import sys

from deploylib import REPO
from livelib import DATASETS


def test_the_idct_stopping_at_four_model_sizes_keeps_the_full_decodes_scores():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "jpeg_fidelity.py"), "--dataset", str(DATASETS), "--cls", "bottle",
                          "--splits", "train", "--limit", "4"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)), int(m.group(4)))
            for m in re.finditer(r"^\| (.+?) \| ([+-][0-9.]+) \| ([0-9.]+) \| (\d+)/4 \| 0/0 \|$", out.stdout, re.M)}
    assert set(rows) == {"full decode + resize", "IDCT to >= 1 x S + resize", "IDCT to >= 2 x S + resize", "IDCT to >= 4 x S + resize"}, out.stdout
    assert rows["full decode + resize"] == (0.0, 0.0, 0), out.stdout
    _, four_max, four_alarms = rows["IDCT to >= 4 x S + resize"]
    one_median, _, _ = rows["IDCT to >= 1 x S + resize"]
    assert four_max < 1.0 and four_alarms == 0, f"the operator's rule moved a good frame's score: {out.stdout}"
    assert one_median > 3.0, f"decoding straight to S no longer shifts scores; revisit IDCT_KEEPS_SIZES: {out.stdout}"
