"""Child process of test_load_memory.py: peak anonymous memory (RssAnon, sampled) while loading a model.

``python load_memory_probe.py MODEL_DIR FORMAT`` prints ``peak_anon_bytes footprint_bytes``. Anonymous
memory is what the process allocates; safetensors' memory-mapped file pages are page cache, not counted.
"""
import sys
import threading
import time

import torch


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def main() -> None:
    import qtune
    from transformers import AutoModelForCausalLM

    path, fmt = sys.argv[1], sys.argv[2]
    base, peak, done = rss_anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=qtune.QTuneConfig(fmt))
    done.set()
    t.join()
    peak[0] = max(peak[0], rss_anon())
    print(peak[0] - base, model.get_memory_footprint())


if __name__ == "__main__":
    main()
