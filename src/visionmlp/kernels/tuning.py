"""Every tuned constant of the fast kernels, with where it was measured and what it bought.

The figures are paired step times on 2 cores (batch 8, torch 2.14-2.15); "Zen 5" is an AMD EPYC Zen 5, "Zen 4" an AMD
EPYC Zen 4 (family 25, model 17, AVX-512 with bf16). A speed-up measured on one CPU kind is unknown on the others;
docs/performance.md has the tables.
"""

# Multiply-adds under which a product keeps F.linear: oneDNN's call costs about 10 us more than MKL's (Zen 5).
ONEDNN_LINEAR_MIN_MACS = 2**20

# Widest kernel whose depth-wise weight gradient oneDNN computes on its fast path. Zen 5, channels-last: 7x3 and 7x1
# kernels took 0.05-0.07 ms per tap at 56x56, 7x4 to 7x7 0.2-0.25 ms; in column slices of 3 the weight gradient of a
# 7x7 kernel ran 4x faster at 7x7 to 28x28, 2x at 56x56.
FAST_WEIGHT_GRAD_WIDTH = 3

# Tokens per slice of MS-MLP's channel MLP at CPU inference in fp32 (twice as many in bf16): the hidden activations
# stay in cache. Zen 5: bf16 4-5 % faster than 1024 bf16 tokens. Zen 4 (MS-MLP-T against one call): fp32 eager 1.07x;
# bf16 eager 0.98x and compiled 0.99x, no gain there.
MS_MLP_INFER_FP32_TOKENS_PER_SLICE = 1024

# Largest hidden activation of one MS-MLP channel-MLP call in CPU training. glibc maps every block above its mmap
# threshold (at most 32 MiB) afresh, with a page fault per 4 KiB at every step; MS-MLP-T's first-stage MLP at batch 8
# has a 38.5 MB hidden activation (Zen 5: training step 4 % faster; Zen 4: 7 %).
MS_MLP_TRAIN_HIDDEN_BYTES = 16 * 2**20
