"""Where a converting run's start-up goes (issue #11): each step ``extract`` takes before its
first batch on ONNX Runtime, timed in fresh processes (MobileNetV2 0.35, random weights,
32x32 uint8 images upscaled to 224), and what Keras's ``keras._tf_keras`` and scikit-learn
cost inside ``import tensorflow`` (``python -X importtime``). Run from the repository root,
alone on the machine:

    KERAS_HOME=$PWD/.keras-home .venv/bin/python benchmarks/cold_start.py
"""

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def steps() -> dict:
    t = [time.perf_counter()]

    def lap():
        t.append(time.perf_counter())
        return round(t[-1] - t[-2], 3)

    import tensorflow as tf  # noqa: F401
    out = {"import tensorflow": lap()}
    from pipeline import extraction as extract
    from pipeline import runtimes
    out["import pipeline"] = lap()
    config = extract.ExtractionConfig(dataset="npz:unused", backbone="mobilenet_v2", alpha=0.35,
                                      weights="none", image_size=224)
    model = extract.FeatureModel(config, (32, 32, 3))
    model.backbone  # noqa: B018
    out["Keras build"] = lap()
    fn = model.graph
    concrete = fn.get_concrete_function()
    out["trace"] = lap()
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    convert_variables_to_constants_v2(concrete, lower_control_flow=False, aggressive_inlining=True)
    out["freezing the variables (as tf2onnx does first; timed apart)"] = lap()
    exported = runtimes.REGISTRY["onnxruntime"].format()[0](fn)
    out["tf2onnx export + checking session"] = lap()
    runtimes.OnnxRunner(exported, workers=2, threads=1)
    out["ONNX Runtime session"] = lap()
    return out


def main() -> None:
    if sys.argv[1:] == ["--steps"]:
        print("STEPS", json.dumps(steps()))
        return
    runs = []
    for _ in range(3):
        proc = subprocess.run([sys.executable, __file__, "--steps"], capture_output=True,
                              text=True, cwd=ROOT)
        runs.append(json.loads(proc.stdout.split("STEPS", 1)[1]))
    for step in runs[0]:
        print(f"{step}: {', '.join(f'{r[step]:.2f}' for r in runs)} s")
    importtime = subprocess.run([sys.executable, "-X", "importtime", "-c", "import tensorflow"],
                                capture_output=True, text=True).stderr
    for name in ("tensorflow", "keras._tf_keras", "sklearn"):
        us = [int(line.split("|")[1]) for line in importtime.splitlines()
              if line.split("|")[-1].strip() == name]
        print(f"import {name} (cumulative, -X importtime, one more process): {us[0] / 1e6:.2f} s")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
