"""Host cost of one graph node on this backend, by kind: mx.async_eval's time over a chain of 400 nodes of one kind
(each reads the one before), divided by 400. Kinds: a custom kernel with a short source, the same kernel with its
source padded to the few-row matvec's length (MLX hashes a custom kernel's whole source at every launch), an
elementwise add, and a reshape (a view: no kernel). Medians of 10 chains after 3 warm ones.
    python bench/studies/host_bound_step/launch_cost.py      (on the GPU machine)
A decoding step is ~11 kernels and ~4 views a layer: this prices each one the step could lose."""
import statistics
import time

import mlx.core as mx

CHAIN = 400
SOURCE = """
  unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < x_shape[0]) out[i] = x[i] + T(1);
"""
short_kernel = mx.fast.cuda_kernel(name="short_source", input_names=["x"], output_names=["out"], source=SOURCE)
padding = "".join(f"  // padding line {i:05d} of a source as long as the few-row matvec's\n" for i in range(170))
long_kernel = mx.fast.cuda_kernel(name="long_source", input_names=["x"], output_names=["out"],
                                  source=SOURCE + padding)


def custom(kernel):
    def node(x):
        return kernel(inputs=[x], template=[("T", x.dtype)], grid=(1024, 1, 1), threadgroup=(256, 1, 1),
                      output_shapes=[x.shape], output_dtypes=[x.dtype])[0]
    return node


kinds = {"custom kernel, short source": custom(short_kernel),
         f"custom kernel, {len(SOURCE + padding)}-character source": custom(long_kernel),
         "elementwise add": lambda x: x + 1,
         "reshape (view)": lambda x: x.reshape(-1, 2) if x.ndim == 1 else x.reshape(-1)}
print("| node kind | build us a node | async_eval us a node | wait ms a chain |")
print("|---|---|---|---|")
for name, node in kinds.items():
    rows = []
    for turn in range(13):
        x = mx.zeros((1024,), dtype=mx.bfloat16)
        mx.eval(x)
        mx.synchronize()
        t0 = time.perf_counter()
        y = x
        for _ in range(CHAIN):
            y = node(y)
        t1 = time.perf_counter()
        mx.async_eval(y)
        t2 = time.perf_counter()
        mx.synchronize()
        t3 = time.perf_counter()
        if turn >= 3:
            rows.append((t1 - t0, t2 - t1, t3 - t2))
    build, inside, wait = (statistics.median(r[j] for r in rows) for j in range(3))
    print(f"| {name} | {build / CHAIN * 1e6:.1f} | {inside / CHAIN * 1e6:.1f} | {wait * 1e3:.2f} |", flush=True)
