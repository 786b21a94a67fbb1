# SPDX-License-Identifier: MIT
# PyTorch scaled_dot_product_attention on the shapes of dense_harness's timing
# mode, every backend that accepts them; the best is the number to beat.
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    from torch.nn.attention.bias import causal_lower_right
except ImportError:
    causal_lower_right = None


def bench(fn, reps=20, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2] * 1e3  # us


backends = [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION)]
dev, dt = "cuda", torch.bfloat16
print(torch.cuda.get_device_name(), torch.__version__)
for L in (32768, 262144):
    for B in (1, 8):
        q = torch.randn(B, 32, 32, 128, device=dev, dtype=dt)
        k = torch.randn(B, 8, L, 128, device=dev, dtype=dt)
        v = torch.randn(B, 8, L, 128, device=dev, dtype=dt)
        res = []
        for name, be in backends:
            variants = [("nomask", dict())]
            if causal_lower_right is not None:
                variants.append(("causal_lr", dict(attn_mask=causal_lower_right(32, L))))
            for vn, kw in variants:
                try:
                    with sdpa_kernel(be):
                        t = bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw))
                    res.append((t, f"{name}/{vn}"))
                except Exception as e:  # backend refuses the shape
                    res.append((float("inf"), f"{name}/{vn}: {type(e).__name__}"))
        byt = B * L * 8 * 128 * 2 * 2
        for t, n in sorted(res):
            if t != float("inf"):
                print(f"sdpa rectify B={B} L={L // 1024}K {n:22s} {t:9.1f} us {byt / t / 1e6:6.2f} TB/s")
        best = min(res)
        print(f"SDPA-BEST rectify B={B} L={L // 1024}K {best[1]} {best[0]:.1f} us")
        del q, k, v
        torch.cuda.empty_cache()
n = 8192
q = torch.randn(1, 32, n, 128, device=dev, dtype=dt)
k = torch.randn(1, 8, n, 128, device=dev, dtype=dt)
v = torch.randn(1, 8, n, 128, device=dev, dtype=dt)
flop = 4.0 * 32 * 128 * n * (n + 1) / 2
res = []
for name, be in backends:
    try:
        with sdpa_kernel(be):
            t = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        res.append((t, name))
        print(f"sdpa prefill n={n} {name:10s} {t:9.1f} us {flop / t / 1e6:7.1f} TFLOP/s")
    except Exception as e:
        print(f"sdpa prefill {name}: {type(e).__name__}")
best = min(res)
print(f"SDPA-BEST prefill n={n} {best[1]} {best[0]:.1f} us {flop / best[0] / 1e6:.1f} TFLOP/s")
