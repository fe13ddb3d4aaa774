"""GPU check for super-weight preservation: the CPU benchmark's experiments on a ~100M-parameter Llama built from
config (nothing downloaded), with bitsandbytes running on CUDA. Prints the summary as JSON and writes the full
results (+ PNG) to $OUT (or outputs/gpu_check_quant/).

    python scripts/gpu_check_quant.py                 # ~5 min on one H100 (3 seeds)
    python scripts/gpu_check_quant.py --seeds "[0]"   # quicker

Needs: torch with CUDA, transformers, peft, tokenizers, bitsandbytes >= 0.50, and trl (pipeline.config imports
it). Extra arguments are passed to scripts/bench_quant.py (any of its keys).
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import bench_quant  # noqa: E402

if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("gpu_check_quant: no CUDA device")
    out = Path(os.environ.get("OUT") or "outputs/gpu_check_quant")
    argv = ["--device", "cuda", "--hidden_size", "1024", "--num_hidden_layers", "8", "--intermediate_size", "4096",
            "--num_attention_heads", "16", "--plant_layers", "[1, 2]", "--blocks", "[64, 256, 1024, 0]",
            "--train_steps", "600", "--qlora_steps", "60", "--work_dir", "/tmp/gpu_check_quant",
            "--output_json", str(out / "gpu_quant.json"), "--output_png", str(out / "gpu_quant.png")] + sys.argv[1:]
    print(torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)
    results = bench_quant.main(argv)
    print(json.dumps(results["summary"], indent=1))
