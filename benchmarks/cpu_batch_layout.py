"""Forward throughput of EfficientNet-Lite0 on CPU by batch size and memory layout (random weights).

Why featcache extracts CNNs in channels_last with batch 8 on CPU. Run: python benchmarks/cpu_batch_layout.py
"""

import time

import timm
import torch

model = timm.create_model("tf_efficientnet_lite0").eval()
results = {}
for channels_last in (False, True):
    net = model.to(memory_format=torch.channels_last) if channels_last else model
    for batch in (8, 16, 32, 64):
        x = torch.randn(batch, 3, 224, 224)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            net.forward_features(x)
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < 3:
                net.forward_features(x)
                n += batch
        results[(channels_last, batch)] = n / (time.perf_counter() - start)
        print(f"channels_last={channels_last} batch={batch}: {results[(channels_last, batch)]:.1f} img/s", flush=True)
print(f"ratio best channels_last / NCHW batch 64: {max(results.values()) / results[(False, 64)]:.2f}x")
